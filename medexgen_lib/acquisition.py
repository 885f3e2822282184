"""Stage 01: get IU X-Ray (or the phantom) into ``images/`` and ``reports/``, or read an
R2Gen ``annotation.json`` (medexgen_lib.annotation) or MIMIC-CXR-JPG (medexgen_lib.mimic) in place.

Downloads use pooch: it streams into a temporary file next to the target,
checks the sha256 when one is configured, retries with back-off and only then
renames the file into place. We add a size check (when configured) inside the
download step, so a short file never reaches its final name. Every archive is
then read to its end and each member checked before anything is extracted: a
truncated archive, or one with absolute paths, ``..``, links or device files,
duplicate names, or more declared bytes or members than configured (or than the
disk has free), is refused with an error naming the archive and member. Size and
sha256, where configured, are checked on every use of an archive.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import pooch

from medexgen_lib.annotation import read_annotation
from medexgen_lib.config import Config, DataConfig
from medexgen_lib.files import honour_umask, read_json, replace_dir, write_json
from medexgen_lib.mimic import check_mimic_layout, read_mimic
from medexgen_lib.phantom import PROJECTIONS_FILE, make_phantom_dataset, phantom_files
from medexgen_lib.reports import BUNDLED_PROJECTIONS, read_reports, write_studies_table
from medexgen_lib.splits import SOURCE_SPLIT_FILE, write_source_split

log = logging.getLogger(__name__)

MARKER = ".medexgen_complete.json"
STATE_FILE = "acquisition.json"
# In images/ and reports/: every file stage 01 wrote there (each file by its own path, never a
# folder) and which source wrote them ("phantom" or "archive"), recorded before it writes them.
# Stage 01 deletes or replaces only what this lists for the source it runs; anything else makes it stop.
MANIFEST = ".medexgen_files.json"
BOOKKEEPING = (".gitkeep", MARKER, MANIFEST)  # never a user's data: git's placeholder and ours


class AcquisitionError(RuntimeError):
    """Data could not be obtained; the message says which file and why."""


class UnsafeArchiveError(AcquisitionError):
    """An archive member would write outside the target or is not a plain file."""


# tarfile reads a long-name or pax header into memory whole before it returns the member
# it describes: one declaring gigabytes (a few MB compressed) would exhaust memory before
# any member could be checked. Real ones hold a path and a few attributes. Likewise a sparse
# member's map (its extension blocks, or a pax 1.0 map) is read whole, thousands of times
# its compressed size; Open-i's archives hold no sparse files, so sparse members are refused.
MAX_META_HEADER_BYTES = 1 << 20
_META_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                      tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _RefusedHeader(Exception):
    """Raised inside tarfile's reader (not a ``TarError``, which ``open`` would swallow)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member, refusing a long-name or pax header over ``MAX_META_HEADER_BYTES``
    and any sparse member before tarfile reads them (``_proc_member`` is the hook tarfile
    leaves to subclasses; the ``_proc_gnusparse_*`` methods read pax sparse maps)."""

    def _proc_member(self, tarfile_obj):
        if self.type in _META_HEADER_TYPES and self.size > MAX_META_HEADER_BYTES:
            raise _RefusedHeader(f"a long-name/pax header at byte {self.offset} declares "
                                 f"{self.size} bytes, over {MAX_META_HEADER_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            self._refuse_sparse()
        return super()._proc_member(tarfile_obj)

    def _refuse_sparse(self, *_):
        raise _RefusedHeader(f"member {self.name!r} at byte {self.offset} is a sparse file "
                             "(its map would be read into memory whole)")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


@dataclass
class AcquisitionResult:
    """What stage 01 found or did."""

    source: str
    images_dir: Path
    reports_dir: Path
    projections_csv: Path | None
    actions: list[str]

    @property
    def did_nothing(self) -> bool:
        return all(a.startswith("already in place") for a in self.actions)


# --------------------------------------------------------------------------- download

class _SizeCheckedDownloader:
    """pooch's HTTP downloader plus a byte-count check before pooch renames the file;
    ``wrote`` says whether it downloaded (pooch calls it only for a missing or stale file)."""

    def __init__(self, expected_size: int = 0, progressbar: bool = True):
        self.expected_size = expected_size
        self.wrote = False
        self.http = pooch.HTTPDownloader(progressbar=progressbar, timeout=60)

    def __call__(self, url, output_file, pooch_obj, check_only=False):
        if check_only:
            return self.http(url, output_file, pooch_obj, check_only=True)
        self.http(url, output_file, pooch_obj)
        self.wrote = True
        size = os.path.getsize(output_file)
        if self.expected_size and size != self.expected_size:
            # ValueError makes pooch delete the temporary file and retry.
            raise ValueError(f"{url}: received {size} bytes, expected {self.expected_size}")
        return None


def download_archive(url: str, dest_dir: str | os.PathLike, *, sha256: str = "",
                     size: int = 0, retries: int = 3, progressbar: bool = True) -> Path:
    """Download ``url`` into ``dest_dir`` and return the file's path.

    An existing file is reused when its size and hash match where they are
    configured; one that does not is downloaded again (pooch re-fetches a file whose
    hash differs; one of the wrong size is deleted first). On failure nothing is left
    at the final name.
    """
    dest_dir = Path(dest_dir)
    fname = url.rstrip("/").rsplit("/", 1)[-1]
    existing = dest_dir / fname
    if size and existing.is_file() and existing.stat().st_size != size:
        log.warning("%s is %d bytes, expected %d (stale or partial): downloading it again",
                    existing, existing.stat().st_size, size)
        existing.unlink()
    known_hash = f"sha256:{sha256}" if sha256 else None
    fetcher = pooch.create(path=dest_dir, base_url="", registry={fname: known_hash},
                           urls={fname: url}, retry_if_failed=retries)
    downloader = _SizeCheckedDownloader(size, progressbar)
    try:
        path = Path(fetcher.fetch(fname, downloader=downloader))
        # pooch downloads into a NamedTemporaryFile (mode 0600) and renames it; an archive reused
        # from dest_dir (perhaps a link to a shared copy) keeps its mode
        return honour_umask(path) if downloader.wrote else path
    except Exception as exc:  # requests / pooch errors -> one sentence for the user
        raise AcquisitionError(
            f"download of {url} failed after {retries + 1} attempt(s): {exc}. "
            f"Nothing was extracted; to work offline, set data.images_archive / "
            f"data.reports_archive to local copies") from None


# --------------------------------------------------------------------------- extraction

def check_archive(archive: str | os.PathLike, max_bytes: int = DataConfig.archive_max_bytes,
                  max_members: int = DataConfig.archive_max_members) -> list[tarfile.TarInfo]:
    """Read ``archive`` to its end and return its members if every one is safe.

    Raises ``AcquisitionError`` for a truncated or corrupt archive, for one whose
    declared sizes add up to more than ``max_bytes`` or that has more than
    ``max_members`` members (checked header by header, so a bomb is refused before
    its data is read), and for duplicate member names (the last copy would silently
    replace the first); ``UnsafeArchiveError`` names the first unsafe member. The
    archive's own root (``./``, as ``tar -C dir .`` writes it) is accepted and skipped.
    """
    archive = Path(archive)
    members: list[tarfile.TarInfo] = []
    kind_of: dict[str, bool] = {}  # normalised name -> is a folder
    duplicates: list[str] = []
    declared = 0
    try:
        with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                problem = _unsafe_reason(member)
                if problem:
                    raise UnsafeArchiveError(
                        f"archive {archive}: member {member.name!r} refused ({problem}); "
                        "nothing was extracted")
                key = str(PurePosixPath(member.name))
                if key == ".":
                    continue
                if key in kind_of and not (kind_of[key] and member.isdir()):
                    duplicates.append(member.name)
                kind_of[key] = member.isdir()
                members.append(member)
                declared += member.size
                if len(members) > max_members:
                    raise AcquisitionError(
                        f"archive {archive} has more than {max_members} members (at "
                        f"{member.name!r}), over data.archive_max_members; nothing was extracted")
                if declared > max_bytes:
                    raise AcquisitionError(
                        f"archive {archive}: member {member.name!r} ({member.size} bytes) brings "
                        f"the declared total to {declared} bytes, over data.archive_max_bytes "
                        f"({max_bytes}); nothing was extracted")
    except _RefusedHeader as exc:
        raise AcquisitionError(f"archive {archive}: {exc}; refused as a possible bomb, "
                               "nothing was extracted") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        detail = " ".join(str(exc).split())  # tarfile's "r:*" lists one line per method tried
        raise AcquisitionError(f"archive {archive} is truncated or corrupt ({detail}); "
                               "nothing was extracted") from None
    if not members:
        raise AcquisitionError(f"archive {archive} is empty; nothing was extracted")
    if duplicates:
        raise AcquisitionError(
            f"archive {archive} has {len(duplicates)} duplicate member name(s), first "
            f"{duplicates[0]!r}; a later copy would silently replace an earlier one, so "
            "nothing was extracted")
    return members


def _unsafe_reason(member: tarfile.TarInfo) -> str:
    path = PurePosixPath(member.name)
    if not path.parts:  # "" or "." (the root folder): harmless only as a folder
        return "" if member.isdir() else "empty name"
    if path.is_absolute() or member.name.startswith(("/", "\\")) or ":" in path.parts[0]:
        return "absolute path"
    if ".." in path.parts:
        return "path leaves the target folder"
    if path.parts[0].startswith(".") and path.parts[0].endswith(".old"):
        return "top-level name of the form .<name>.old is reserved for the folder swap"
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if member.isdev():
        return "device or FIFO"
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder"
    return ""


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike,
                 staging_root: str | os.PathLike, max_bytes: int = DataConfig.archive_max_bytes,
                 max_members: int = DataConfig.archive_max_members,
                 before_swap: Callable[[list[str]], None] | None = None) -> int:
    """Extract a checked archive into ``target`` through a staging folder.

    The archive is checked completely first (``check_archive``), and its declared
    size against the free disk space; then it is extracted into a staging folder
    (with tarfile's ``data`` filter as a second guard) and each top-level entry is
    swapped into ``target`` by renames (``replace_dir``): an entry already there is
    removed only after the new one took its place, and put back if the swap fails.
    ``before_swap`` is called with the paths (relative to ``target``) of every file about to be
    swapped in, before the first swap. Returns the number of files extracted.
    """
    archive, target, staging_root = Path(archive), Path(target), Path(staging_root)
    members = check_archive(archive, max_bytes, max_members)
    staging_root.mkdir(parents=True, exist_ok=True)
    declared, free = sum(m.size for m in members), shutil.disk_usage(staging_root).free
    if declared > free:
        raise AcquisitionError(f"archive {archive} declares {declared} bytes but only {free} "
                               f"bytes are free under {staging_root}; nothing was extracted")
    staging = staging_root / f"extract-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
            tar.extractall(staging, members=members, filter="data")
        target.mkdir(parents=True, exist_ok=True)
        entries = sorted(staging.iterdir())
        if before_swap is not None:
            before_swap([path.relative_to(staging).as_posix() for path in sorted(staging.rglob("*"))
                         if path.is_file()])
        for entry in entries:
            replace_dir(entry, target / entry.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise AcquisitionError(f"extracting {archive} into {target} failed: {exc}; what was "
                               f"in {target} before is kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(1 for m in members if m.isfile())


def verify_archive(archive: str | os.PathLike, size: int = 0, sha256: str = "") -> None:
    """Check ``archive``'s byte size and sha256 where configured (0 / empty: unchecked),
    on every use, not only after a download; a mismatch names the file and both values."""
    archive = Path(archive)
    actual = archive.stat().st_size
    if size and actual != size:
        raise AcquisitionError(f"archive {archive} is {actual} bytes, expected {size} "
                               "(data.images_size / data.reports_size); nothing was extracted")
    if sha256:
        digest = hashlib.sha256()
        with open(archive, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            raise AcquisitionError(f"archive {archive} has sha256 {digest.hexdigest()}, expected "
                                   f"{sha256} (data.images_sha256 / data.reports_sha256); "
                                   "nothing was extracted")


# --------------------------------------------------------------------------- stage

def acquire(cfg: Config) -> AcquisitionResult:
    """Make ``images/`` and ``reports/`` hold the configured data set.

    Idempotent: a folder completed earlier (marked by ``.medexgen_complete.json``)
    is left alone and the result says so. Stage 01 deletes or replaces only what its manifest
    (``.medexgen_files.json`` in ``images/`` and ``reports/``) lists: a folder holding anything
    else stops it with ``AcquisitionError`` naming the folder and the file.
    """
    paths, data = cfg.paths, cfg.data
    paths.make_dirs()
    state_path = paths.processed / STATE_FILE
    previous = read_json(state_path) if state_path.exists() else None
    if previous and previous.get("source") != data.source:
        raise AcquisitionError(
            f"{paths.data_dir} holds {previous.get('source')!r} data but the config asks for "
            f"{data.source!r}; set paths.data_dir to another folder or empty this one")
    if data.source == "phantom":
        actions = [_acquire_phantom(cfg, previous)]
        projections = paths.reports / PROJECTIONS_FILE
    elif data.source == "openi":
        actions = [
            _acquire_archive(data.images_url, data.images_archive, data.images_sha256,
                             data.images_size, paths.images, cfg),
            _acquire_archive(data.reports_url, data.reports_archive, data.reports_sha256,
                             data.reports_size, paths.reports, cfg),
        ]
        projections = Path(data.projections_csv) if data.projections_csv else BUNDLED_PROJECTIONS
    elif data.source == "annotation":
        annotation_file, image_root = annotation_paths(cfg)
        for path, key in ((annotation_file, "data.annotation_file"), (image_root, "data.image_root")):
            if not path.exists():
                raise AcquisitionError(f"{path} does not exist; set {key} (data.source annotation)")
        actions = [f"already in place: {annotation_file}, images under {image_root}; nothing to do"]
        projections = Path(data.projections_csv) if data.projections_csv else None
    elif data.source == "mimic":
        actions = [check_mimic_layout(paths.data_dir)]
        projections = None
    else:
        actions = [_check_folder(paths.images, "image"), _check_folder(paths.reports, "report")]
        projections = Path(data.projections_csv) if data.projections_csv else BUNDLED_PROJECTIONS
    if projections is not None and not projections.exists():
        raise AcquisitionError(f"projections table {projections} does not exist")
    write_json(state_path, {"source": data.source, "data": cfg.to_dict()["data"],
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for action in actions:
        log.info(action)
    return AcquisitionResult(data.source, paths.images, paths.reports, projections, actions)


def build_studies_table(cfg: Config, result: AcquisitionResult) -> pd.DataFrame:
    """Read the acquired reports into ``processed/studies.parquet`` (+ the config used);
    malformed files and duplicate uids or images are listed in ``logs/acquisition_malformed.json``.
    A source that carries its split (annotation, mimic) also gets ``processed/source_split.json``."""
    splits = None
    if result.source == "annotation":
        table, splits = read_annotation(*annotation_paths(cfg), result.projections_csv)
        where = annotation_paths(cfg)[0]
    elif result.source == "mimic":
        table, splits = read_mimic(cfg.paths.data_dir)
        where = Path(cfg.paths.data_dir)
    else:
        table = read_reports(result.reports_dir, result.images_dir, result.projections_csv)
        where = result.reports_dir
    if table.empty:
        raise AcquisitionError(f"no readable reports under {where}")
    write_studies_table(table, cfg.paths.studies_table)
    if splits is not None:
        write_source_split(splits, cfg.paths.processed / SOURCE_SPLIT_FILE)
    cfg.save(cfg.paths.processed / "config_01_acquisition.json")
    malformed = table.attrs.get("malformed", [])
    duplicates = {key: table.attrs.get(key, []) for key in
                  ("duplicate_uids", "duplicate_images", "repeated_image_ids")}
    write_json(cfg.paths.logs / "acquisition_malformed.json",
               {"count": len(malformed), "files": malformed, **duplicates})
    return table


def annotation_paths(cfg: Config) -> tuple[Path, Path]:
    """The annotation file and the image root of ``data.source annotation`` (defaults: R2Gen's
    ``annotation.json`` and ``images/`` in ``paths.data_dir``)."""
    data_dir = Path(cfg.paths.data_dir)
    return (Path(cfg.data.annotation_file or data_dir / "annotation.json").expanduser(),
            Path(cfg.data.image_root or cfg.paths.images).expanduser())


def _acquire_phantom(cfg: Config, previous: dict | None) -> str:
    data, paths = cfg.data, cfg.paths
    settings = {"n_phantom_studies": data.n_phantom_studies, "phantom_seed": data.phantom_seed,
                "phantom_image_size": data.phantom_image_size}
    marker = paths.reports / MARKER
    if marker.exists() and previous and all(previous["data"].get(k) == v for k, v in settings.items()):
        return (f"already in place: phantom set of {data.n_phantom_studies} studies "
                f"(seed {data.phantom_seed}) in {paths.data_dir}; nothing to do")
    # Other phantom settings: an earlier phantom's files are replaced, and nothing else is touched.
    folders = {"images": paths.images, "reports": paths.reports}
    owned = {name: _owned_files(folder, "phantom") for name, folder in folders.items()}
    if not any(owned.values()):
        owned = _older_phantom_files(paths, previous)
    for name, folder in folders.items():
        _refuse_foreign(folder, owned[name], "for data extracted there use -p data.source folder; "
                        "for the phantom, point paths.data_dir at another folder")
    planned = _by_folder(phantom_files(data.n_phantom_studies, data.phantom_seed))
    marker.unlink(missing_ok=True)  # nothing is "in place" until the new set is complete
    for name, folder in folders.items():  # listed first: an interruption leaves only listed files
        _record_files(folder, owned[name] | planned[name], "phantom")
    for name, folder in folders.items():
        _remove_listed(folder, owned[name])
    make_phantom_dataset(data.n_phantom_studies, data.phantom_seed, paths.data_dir,
                         image_size=data.phantom_image_size)
    for name, folder in folders.items():
        _record_files(folder, planned[name], "phantom")
    write_json(marker, settings)
    return f"generated phantom set: {data.n_phantom_studies} studies (seed {data.phantom_seed})"


def _acquire_archive(url: str, local_archive: str, sha256: str, size: int,
                     target: Path, cfg: Config) -> str:
    marker = target / MARKER
    if marker.exists():
        info = read_json(marker)
        return (f"already in place: {info['files']} files from {info['archive']} in {target}; "
                "nothing to do")
    owned = _owned_files(target, "archive")
    _refuse_foreign(target, owned, "for data extracted there use -p data.source folder; else point "
                    "paths.data_dir at another folder")
    if local_archive:
        archive = Path(local_archive)
        if not archive.exists():
            raise AcquisitionError(f"local archive {archive} does not exist")
        if archive.is_dir():
            raise AcquisitionError(f"local archive {archive} is a folder; for already "
                                   "extracted data use data.source='folder'")
        downloaded = False
    else:
        archive = download_archive(url, cfg.paths.temp, sha256=sha256, size=size,
                                   retries=cfg.data.download_retries)
        downloaded = True
    try:
        verify_archive(archive, size, "" if downloaded else sha256)  # pooch checked the hash
        n_files = safe_extract(archive, target, cfg.paths.temp, cfg.data.archive_max_bytes,
                               cfg.data.archive_max_members,
                               before_swap=lambda names: _record_files(target, owned | set(names), "archive"))
    except AcquisitionError:
        if downloaded:  # a bad download must not be reused by the next run
            archive.unlink(missing_ok=True)
        raise
    write_json(marker, {"archive": archive.name, "files": n_files})
    return f"extracted {n_files} files from {archive} into {target}"


def _check_folder(folder: Path, what: str) -> str:
    suffixes = (".xml",) if what == "report" else (".png", ".jpg", ".jpeg")
    n_files = sum(1 for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    if not n_files:
        raise AcquisitionError(f"{folder} holds no {what} files; extract Open-i's archive "
                               "there or set data.source='openi'")
    return f"already in place: {n_files} {what} files in {folder}; nothing to do"


def _owned_files(folder: Path, source: str) -> set[str]:
    """The files ``folder``'s manifest lists as written by stage 01 from ``source`` ("phantom" or
    "archive"; paths relative to ``folder``, each file by itself). Files another source wrote, or a
    manifest naming no source (an older MedExGen's, whose folder entries covered anything put in
    them later), are not this source's to replace: none are returned."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return set()
    payload = read_json(manifest)
    if isinstance(payload, dict) and payload.get("source") != source:
        return set()
    files = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise AcquisitionError(f"{manifest} is damaged (no list of files), so stage 01 cannot tell "
                               f"its own files from others; empty {folder} yourself or point "
                               "paths.data_dir at another folder")
    return {f for f in files if not PurePosixPath(f).is_absolute() and ".." not in PurePosixPath(f).parts}


def _record_files(folder: Path, files: set[str], source: str) -> None:
    write_json(folder / MANIFEST, {"written_by": "MedExGen stage 01 (acquisition); it deletes or "
                                                 "replaces only these", "source": source,
                                   "files": sorted(files)})


def _older_phantom_files(paths, previous: dict | None) -> dict[str, set[str]]:
    """The files a phantom run of a MedExGen that kept no manifest wrote: its completion marker
    and the settings it recorded in ``processed/acquisition.json`` name exactly those files."""
    data = (previous or {}).get("data") or {}
    if not ((paths.reports / MARKER).exists() and (previous or {}).get("source") == "phantom"):
        return _by_folder([])
    try:
        return _by_folder(phantom_files(int(data["n_phantom_studies"]), int(data["phantom_seed"])))
    except (KeyError, TypeError, ValueError):
        return _by_folder([])


def _by_folder(files: list[str]) -> dict[str, set[str]]:
    """``images/x.png`` -> ``{"images": {"x.png"}, ...}``."""
    return {name: {f.split("/", 1)[1] for f in files if f.startswith(f"{name}/")}
            for name in ("images", "reports")}


def _refuse_foreign(folder: Path, owned: set[str], advice: str) -> None:
    """Raise ``AcquisitionError`` naming ``folder`` and the first file in it (sorted) that stage 01
    did not write: it deletes or replaces nothing else."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        here = Path(root)
        for name in sorted(files) + sorted(d for d in dirs if (here / d).is_symlink()):
            relative = (here / name).relative_to(folder).as_posix()
            if relative not in BOOKKEEPING and relative not in owned:
                raise AcquisitionError(f"{folder} holds {relative}, which MedExGen did not write; stage 01 "
                                       f"never deletes or replaces it: {advice}")


def _remove_listed(folder: Path, owned: set[str]) -> None:
    """Delete the listed files (a manifest lists files only: a folder is never removed whole)."""
    for relative in sorted(owned):
        path = folder / relative
        if path.is_symlink() or path.is_file():
            path.unlink()
