"""Writing files so that a crash never leaves one half-written: temporary file, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as tmp:
        try:
            tmp.write(text)
            tmp.flush()
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)  # a failed write (disk full) leaves no temporary file behind
            raise
    os.replace(tmp.name, path)
    return path


def write_json(path: str | os.PathLike, payload) -> Path:
    """``payload`` as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2))


def read_json(path: str | os.PathLike):
    """Parse a JSON file this project wrote; a damaged one raises ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged, not valid JSON ({exc}); delete it and re-run "
                         "the stage that writes it") from None


def save_figure(fig, path: str | os.PathLike, close: bool = True) -> Path:
    """Save a matplotlib figure as PNG (creating the folder) and, by default, close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return path
