"""Open-i XML reports -> the studies table (one row per report file).

XML is parsed with defusedxml: a file that declares entities or a DTD is
refused (never expanded), named in the log and counted as malformed; the other
files are still read. Reports without text or images are kept and flagged.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pandas as pd
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from medexgen_lib.files import atomic_path

log = logging.getLogger(__name__)

SECTIONS = ("findings", "impression", "indication", "comparison")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Open-i's reports are a few kB each; a file over this is refused (named) before parsing.
MAX_REPORT_BYTES = 1_000_000
# Frontal/lateral for every image of the Open-i collection (Kaggle's table, CC BY-NC-ND 4.0;
# see the README beside it): the default for real data when no table is given.
BUNDLED_PROJECTIONS = Path(__file__).parent / "data" / "iuxray_projections" / "indiana_projections.csv"
COLUMNS = ["uid", "report_file", *SECTIONS, "mesh_major", "mesh_minor", "image_ids",
           "image_paths", "projections", "projection_source", "n_images", "no_findings",
           "no_impression", "no_image", "image_missing"]


class MalformedReport(ValueError):
    """A report file that cannot be read safely."""


def read_reports(reports_dir: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                 projections: str | os.PathLike | pd.DataFrame | None = None,
                 max_report_bytes: int = MAX_REPORT_BYTES) -> pd.DataFrame:
    """The studies table for every ``*.xml`` (any case) under ``reports_dir``, one row per uid.

    ``images_dir``: where image files are looked up by id (any depth), so each
    study gets resolved paths and an ``image_missing`` flag. ``projections``: a
    Kaggle-format table (``uid,filename,projection``) giving frontal/lateral per
    image (``acquisition`` passes the bundled whole-collection table for real data);
    without one, projections are ``unknown`` (Open-i's captions describe the study,
    not the image, so they are not a reliable source). ``projection_source`` names
    the table that gave a study's projections, or ``unknown``.
    Malformed files, files over ``max_report_bytes``, and entries named ``*.xml`` that are
    not readable files (a broken link, a link loop, a folder, a FIFO) are listed in
    ``df.attrs["malformed"]`` as (file, reason). Uids are read without surrounding
    whitespace and compared without case; a uid declared by a second file is
    kept from the first file in sorted order (numeric file names in number order),
    logged with both file names and listed in ``df.attrs["duplicate_uids"]`` as
    (uid, kept file, dropped file). Images: a name found in two folders uses the
    first path in sorted order, an id listed twice in one report is kept once; both
    are logged and listed in ``df.attrs["duplicate_images"]`` /
    ``df.attrs["repeated_image_ids"]``.
    """
    reports_dir = Path(reports_dir)
    if not reports_dir.is_dir():
        raise FileNotFoundError(f"reports folder {reports_dir} does not exist; "
                                "run notebook 01_acquisition first")
    # by name, not suffix: a file named ".xml" has no suffix to pathlib
    files = sorted((p for p in reports_dir.rglob("*") if p.name.lower().endswith(".xml")), key=_report_sort_key)
    image_index, duplicate_images = (_index_images(Path(images_dir)) if images_dir is not None
                                     else (None, []))
    projection_of = _load_projections(projections) if projections is not None else {}
    table_name = _projection_table_name(projections)
    rows, malformed, duplicate_uids, repeated_ids = [], [], [], []
    file_of: dict[str, Path] = {}  # uid, case-folded -> the file it was kept from
    for path in files:
        try:
            row = parse_report(path, max_report_bytes)
        except MalformedReport as exc:
            log.warning("skipping malformed report %s: %s", path, exc)
            malformed.append((str(path), str(exc)))
            continue
        key = row["uid"].casefold()
        if key in file_of:
            log.warning("report %s declares uid %s, already read from %s; keeping the first "
                        "(sorted order)", path, row["uid"], file_of[key])
            duplicate_uids.append((row["uid"], str(file_of[key]), str(path)))
            continue
        file_of[key] = path
        unique_ids = list(dict.fromkeys(row["image_ids"]))
        if len(unique_ids) < len(row["image_ids"]):
            log.warning("report %s lists image(s) more than once; each is used once", path)
            repeated_ids.append((str(path), len(row["image_ids"]) - len(unique_ids)))
            row["image_ids"] = unique_ids
        _add_images(row, image_index, projection_of, table_name)
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs.update(malformed=malformed, duplicate_uids=duplicate_uids,
                       duplicate_images=duplicate_images, repeated_image_ids=repeated_ids)
    log.info("read %d reports from %s (%d malformed, %d duplicate uids, %d image names in two "
             "folders, %d reports listing an image twice)", len(table), reports_dir,
             len(malformed), len(duplicate_uids), len(duplicate_images), len(repeated_ids))
    return table


def parse_report(path: str | os.PathLike, max_bytes: int = MAX_REPORT_BYTES) -> dict:
    """One report's sections, MeSH terms and image ids (no entity expansion); a file over
    ``max_bytes``, or anything but a readable regular file, is refused before it is parsed. A
    section given in several elements keeps all their texts, joined in document order."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:  # a broken link, a link loop, no permission
        raise MalformedReport(f"cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise MalformedReport("a directory, not a report file" if stat.S_ISDIR(info.st_mode) else
                              "not a regular file (a FIFO, device or socket); not opened")
    size = info.st_size
    if size > max_bytes:
        raise MalformedReport(f"{size} bytes, over the {max_bytes}-byte limit for one report "
                              "(Open-i's are a few kB); not parsed")
    try:
        root = SafeET.parse(str(path), forbid_dtd=True).getroot()
    except DefusedXmlException as exc:
        raise MalformedReport(f"refused: declares a DTD or entities ({type(exc).__name__}); "
                              "entities are never expanded") from None
    except SafeET.ParseError as exc:
        raise MalformedReport(f"not well-formed XML ({exc})") from None
    except LookupError as exc:  # an encoding declaration Python does not know
        raise MalformedReport(f"wrong encoding declaration ({exc})") from None
    except OSError as exc:  # unreadable although it is a file (permissions, I/O error)
        raise MalformedReport(f"cannot be read ({exc.strerror or exc})") from None
    if root.tag != "eCitation":
        raise MalformedReport(f"root element is <{root.tag}>, expected <eCitation>")
    texts: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for element in root.iter("AbstractText"):
        label = (element.get("Label") or "").lower()
        text = " ".join("".join(element.itertext()).split())
        if label in texts and text:
            texts[label].append(text)
    for label, parts in texts.items():
        if len(parts) > 1:
            log.info("report %s has %d %s elements; their texts are joined", path, len(parts), label.upper())
    sections = {name: " ".join(parts) for name, parts in texts.items()}
    uid_element = root.find("uId")
    uid = (uid_element.get("id") or "").strip() if uid_element is not None else ""
    uid = uid or f"CXR{path.stem}"
    mesh = root.find("MeSH")
    image_ids = [el.get("id") for el in root.findall("parentImage") if el.get("id")]
    return {
        "uid": uid,
        "report_file": path.name,
        **sections,
        "mesh_major": _texts(mesh, "major"),
        "mesh_minor": _texts(mesh, "minor"),
        "image_ids": image_ids,
    }


def write_studies_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Save the table as parquet, atomically (a temporary file, then rename)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return Path(path)


def load_studies_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read the studies table written by notebook 01, with list columns as lists."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"studies table {path} does not exist; "
                                "run notebook 01_acquisition first")
    table = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:  # written by an older MedExGen (projection_source came with the bundled table)
        raise ValueError(f"studies table {path} lacks column(s) {missing}; it was written by an "
                         "older version: rerun notebook 01_acquisition")
    for column in ("mesh_major", "mesh_minor", "image_ids", "image_paths", "projections"):
        table[column] = table[column].map(list)
    return table


def _report_sort_key(path: Path):
    # isdecimal, not isdigit: int() refuses digits such as "²" that isdigit accepts
    return (0, int(path.stem), "") if path.stem.isdecimal() else (1, 0, path.stem)


def _texts(parent, tag: str) -> list[str]:
    if parent is None:
        return []
    return [" ".join(el.text.split()) for el in parent.findall(tag) if el.text and el.text.strip()]


def _index_images(images_dir: Path) -> tuple[dict[str, Path], list[tuple[str, str, str]]]:
    """Image id -> path; an id found twice (another folder or suffix) keeps the first path in
    sorted order, and each such choice is logged and returned as (id, kept, ignored)."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist; "
                                "run notebook 01_acquisition first")
    index: dict[str, Path] = {}
    duplicates = []
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if path.stem in index:
            log.warning("image %s has the same id as %s; using %s", path, index[path.stem],
                        index[path.stem])
            duplicates.append((path.stem, str(index[path.stem]), str(path)))
            continue
        index[path.stem] = path
    return index, duplicates


def _projection_table_name(projections: str | os.PathLike | pd.DataFrame | None) -> str:
    """How the studies table names where projections came from."""
    if projections is None:
        return ""
    if isinstance(projections, pd.DataFrame):
        return "given table"
    if Path(projections).resolve() == BUNDLED_PROJECTIONS.resolve():
        return "bundled IU X-Ray table"
    return str(projections)


def _load_projections(projections: str | os.PathLike | pd.DataFrame) -> dict[str, str]:
    """Map Open-i image id -> 'frontal'/'lateral' from a Kaggle-format table."""
    table = projections if isinstance(projections, pd.DataFrame) else pd.read_csv(projections)
    missing = {"filename", "projection"} - set(table.columns)
    if missing:
        raise ValueError(f"projections table {projections if not isinstance(projections, pd.DataFrame) else ''}"
                         f" lacks column(s) {sorted(missing)}; expected uid,filename,projection")
    mapping = {}
    uids = table["uid"] if "uid" in table.columns else [None] * len(table)
    for uid, filename, projection in zip(uids, table["filename"], table["projection"]):
        stem = str(filename).removesuffix(".png").removesuffix(".dcm")
        image_id = stem if stem.startswith("CXR") else f"CXR{stem}"
        mapping[image_id] = str(projection).strip().lower()
        if uid is not None and not stem.startswith("CXR"):
            # Study 1's XML names its images CXR1_1_IM-...: 'CXR' + uid + '_' + file stem.
            mapping.setdefault(f"CXR{uid}_{stem}", mapping[image_id])
    return mapping


def _add_images(row: dict, image_index: dict[str, Path] | None, projection_of: dict[str, str],
                table_name: str) -> None:
    ids = row["image_ids"]
    if image_index is None:
        row["image_paths"] = [""] * len(ids)
    else:
        row["image_paths"] = [str(image_index[i]) if i in image_index else "" for i in ids]
    row["projections"] = [projection_of.get(i, "unknown") for i in ids]
    row["projection_source"] = (table_name if any(i in projection_of for i in ids)
                                else "unknown")
    row["n_images"] = len(ids)
    row["no_findings"] = not row["findings"]
    row["no_impression"] = not row["impression"]
    row["no_image"] = not ids
    row["image_missing"] = image_index is not None and any(p == "" for p in row["image_paths"])
