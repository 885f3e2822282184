"""Writing files so that a crash never leaves one half-written: temporary file, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path next to ``path``: renamed onto it when the block succeeds, removed
    when it fails (a full disk, an interruption), so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask: read from ``/proc`` where Linux shows it (setting it to read it
    would briefly change it for every thread), else set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> Path:
    """Give ``path``, and for a folder everything in it, the modes a plain ``open`` / ``mkdir``
    gives under the umask (0644 / 0755 under 022): ``mkstemp``, ``mkdtemp`` and safetensors
    create 0600 / 0700, which would leave a copied model folder unreadable to colleagues. A
    folder keeps its setgid bit (made inside a group's setgid folder, it passes the group on). A
    link is left alone: its target is not ours to change."""
    path = Path(path)
    mask = current_umask()
    if path.is_symlink():
        return path
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return path

    def folder_mode(folder: str | os.PathLike) -> int:
        return (0o777 & ~mask) | (os.stat(folder).st_mode & stat.S_ISGID)

    os.chmod(path, folder_mode(path))
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), folder_mode(os.path.join(folder, name)))
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, payload) -> Path:
    """``payload`` as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2))


def read_json(path: str | os.PathLike):
    """Parse a JSON file this project wrote; a damaged one raises ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # nesting too deep
        raise ValueError(f"{path} is damaged, not valid JSON ({exc}); delete it and re-run "
                         "the stage that writes it") from None


def read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``max_bytes``: a link to
    /dev/zero, a FIFO (which would block) or a folder is refused before it is read, and a file
    longer than ``max_bytes`` is refused after reading no more than one byte past it.
    ``ValueError`` naming the file; ``FileNotFoundError`` where there is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not stat.S_ISREG(path.stat().st_mode):
        kind = "a directory" if path.is_dir() else "a device, FIFO or socket"
        raise ValueError(f"{path} is not a regular file ({kind})")
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is over {max_bytes} bytes, more than any such file MedExGen writes; "
                         "refused")
    return data


def save_figure(fig, path: str | os.PathLike, close: bool = True) -> Path:
    """Save a matplotlib figure as PNG (creating the folder) and, by default, close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return Path(path)


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap ``new`` (a folder, or a file) into ``target`` by renames; the old one is kept as
    ``.<name>.old`` until the new one is in place and removed only then.

    If the second rename fails the old one is put back at once; a crash between the
    renames leaves ``.<name>.old``, which ``recover_dir`` puts back.
    """
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old")
    recover_dir(target)
    _remove(old)
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        recover_dir(target)
        raise
    _remove(old)


def discard_dir(target: str | os.PathLike) -> None:
    """Remove ``target`` (folder or file) and any ``.<name>.old`` an interrupted ``replace_dir``
    left, so that ``recover_dir`` cannot bring the old one back."""
    target = Path(target)
    _remove(target)
    _remove(target.with_name(f".{target.name}.old"))


def recover_dir(target: str | os.PathLike) -> None:
    """Put ``.<name>.old`` back at ``target`` if a ``replace_dir`` swap was interrupted."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not (target.exists() or target.is_symlink()) and (old.exists() or old.is_symlink()):
        os.replace(old, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
