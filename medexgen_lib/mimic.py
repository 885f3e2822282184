"""MIMIC-CXR-JPG 2.0.0, as PhysioNet ships it, -> the studies table and MIMIC's official split.

Read in place under ``paths.data_dir`` (nothing is copied):

- ``mimic-cxr-2.0.0-split.csv.gz`` (``dicom_id, study_id, subject_id, split``): the studies and
  their split; ``validate`` is ``val``. A study whose images are in two splits is refused.
- ``mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id, ..., ViewPosition``): ``PA``/``AP`` are
  frontal, ``LATERAL``/``LL`` lateral; images of any other view (oblique, decubitus, none given)
  or without a metadata row are left out of the study and counted. A study's images are ordered
  PA, AP, LATERAL, LL (then by dicom_id), so the model's frontal view is a PA where there is one.
- ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``: the images (one missing on disk flags the
  study ``image_missing``, as IU X-Ray's are).
- ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt``: MIMIC-CXR 2.0.0's free-text reports (unpacked from
  ``mimic-cxr-reports.zip`` into the same ``files/``), sectioned by ``mimic_sections``. A study
  without FINDINGS or IMPRESSION is kept and flagged (``no_findings``/``no_impression``); a report
  with no section at all, missing, unreadable or over ``reports.MAX_REPORT_BYTES`` is also named
  in the log and listed in ``logs/acquisition_malformed.json``.

Each study is one row, uid ``s<study_id>`` (MIMIC's folder name). A missing CSV or ``files/``
folder, a CSV without its columns, a split other than train/validate/test, or no report text in
the whole set is refused with ``MimicError``, one line naming the file.
"""

from __future__ import annotations

import logging
import os
import stat
import zlib
from pathlib import Path

import pandas as pd

from medexgen_lib.mimic_sections import section_report
from medexgen_lib.reports import COLUMNS, MAX_REPORT_BYTES
from medexgen_lib.splits import SPLITS

log = logging.getLogger(__name__)

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
VIEW_RANK = {"PA": 0, "AP": 1, "LATERAL": 2, "LL": 3}  # frontal first, a PA before an AP
PROJECTION = {"PA": "frontal", "AP": "frontal", "LATERAL": "lateral", "LL": "lateral"}
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
MISSING = "missing (no such file)"


class MimicError(ValueError):
    """MIMIC-CXR files that cannot be used; the message names the file."""


def check_mimic_layout(root: str | os.PathLike) -> str:
    """Say what is in place, or raise ``MimicError`` naming the first file or folder missing."""
    root = Path(root)
    for name in (SPLIT_CSV, METADATA_CSV, "files"):
        if not (root / name).exists():
            raise MimicError(f"{root / name} does not exist: data.source mimic reads MIMIC-CXR-JPG 2.0.0 "
                             "as PhysioNet ships it (both CSVs and files/) from paths.data_dir")
    return f"already in place: MIMIC-CXR-JPG files in {root}; nothing to do"


def read_mimic(root: str | os.PathLike, max_report_bytes: int = MAX_REPORT_BYTES
               ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The studies table (columns of ``reports.COLUMNS``) and the split of the MIMIC-CXR-JPG
    set unpacked in ``root``."""
    root = Path(root)
    check_mimic_layout(root)
    images = _read_csv(root / SPLIT_CSV, ["dicom_id", "study_id", "subject_id", "split"])
    views = _read_csv(root / METADATA_CSV, ["dicom_id", "ViewPosition"])
    unknown = sorted(set(images["split"]) - set(SPLIT_NAMES))
    if unknown:
        raise MimicError(f"{root / SPLIT_CSV} has split {unknown[0]!r}; expected train, validate or test")
    per_study = images.groupby("study_id")["split"].nunique()
    if (per_study > 1).any():
        study = per_study[per_study > 1].index[0]
        found = sorted(set(images.loc[images["study_id"] == study, "split"]))
        raise MimicError(f"{root / SPLIT_CSV}: study {study} is in both {found[0]} and {found[1]}")
    view_of = dict(zip(views["dicom_id"], views["ViewPosition"].fillna("").str.strip().str.upper()))
    images = images.assign(view=images["dicom_id"].map(view_of).fillna(""))
    images = images.assign(rank=images["view"].map(VIEW_RANK))
    ignored = int(images["rank"].isna().sum())
    images = images.sort_values(["subject_id", "study_id", "rank", "dicom_id"], na_position="last")
    kept = images[images["rank"].notna()]
    views_of: dict[str, list[tuple[str, str]]] = {}
    for study, dicom, view in zip(kept["study_id"], kept["dicom_id"], kept["view"]):
        views_of.setdefault(study, []).append((dicom, view))
    studies = images.drop_duplicates("study_id")
    rows, malformed, splits = [], [], {name: [] for name in SPLITS}
    for subject, study, split in zip(studies["subject_id"], studies["study_id"], studies["split"]):
        row = _row(root, subject, study, views_of.get(study, []), max_report_bytes, malformed)
        rows.append(row)
        splits[SPLIT_NAMES[split]].append(row["uid"])
    table = pd.DataFrame(rows, columns=COLUMNS)
    if len(table) and table["report_file"].eq("").all():
        raise MimicError(f"no free-text report (sXXXXXXXX.txt) under {root / 'files'}: unpack MIMIC-CXR's "
                         "mimic-cxr-reports.zip into paths.data_dir beside the images")
    table.attrs.update(malformed=malformed, ignored_images=ignored)
    if ignored:
        log.warning("%d image(s) of a view other than PA, AP, LATERAL or LL (or without metadata) left out",
                    ignored)
    log.info("read %d MIMIC-CXR studies from %s (%s; %d without FINDINGS, %d reports malformed or missing)",
             len(table), root, ", ".join(f"{n} {len(u)}" for n, u in splits.items()),
             int(table["no_findings"].sum()), len(malformed))
    return table, splits


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, compression="gzip", keep_default_na=False,
                            na_values=[""])
    except FileNotFoundError:
        raise MimicError(f"{path} does not exist (MIMIC-CXR-JPG 2.0.0 ships it)") from None
    except (OSError, EOFError, zlib.error, ValueError, pd.errors.ParserError) as exc:
        raise MimicError(f"{path} cannot be read as a gzipped CSV: {' '.join(str(exc).split())}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MimicError(f"{path} lacks column(s) {missing}; MIMIC-CXR-JPG 2.0.0's has {columns}")
    ids = [c for c in columns if c.endswith("_id")]
    empty = table[ids].isna().any(axis=1)
    if empty.any():
        raise MimicError(f"{path} line {int(empty.idxmax()) + 2} has an empty {' or '.join(ids)}")
    return table


def _row(root: Path, subject: str, study: str, views: list[tuple[str, str]], max_bytes: int,
         malformed: list) -> dict:
    """One study's row: its kept images (``(dicom_id, ViewPosition)``, in view order) and report."""
    relative = f"files/p{subject[:2]}/p{subject}/s{study}"
    paths = [os.path.join(root, relative, f"{dicom}.jpg") for dicom, _ in views]
    found = [path if os.path.isfile(path) else "" for path in paths]
    report = root / f"{relative}.txt"
    sections, problem = _sections(report, max_bytes)
    if problem:
        log.warning("MIMIC report %s: %s; the study is kept, flagged", report, problem)
        malformed.append((str(report), problem))
    return {"uid": f"s{study}", "report_file": "" if problem == MISSING else f"{relative}.txt",
            "findings": sections.get("findings", ""), "impression": sections.get("impression", ""),
            "indication": sections.get("indication", "") or sections.get("history", ""),
            "comparison": sections.get("comparison", ""), "mesh_major": [], "mesh_minor": [],
            "image_ids": [dicom for dicom, _ in views], "image_paths": found,
            "projections": [PROJECTION[view] for _, view in views],
            "projection_source": METADATA_CSV if views else "unknown", "n_images": len(views),
            "no_findings": not sections.get("findings"), "no_impression": not sections.get("impression"),
            "no_image": not views, "image_missing": "" in found}


def _sections(report: Path, max_bytes: int) -> tuple[dict[str, str], str]:
    """The report's sections and what was wrong with it ('' when nothing)."""
    try:
        info = report.stat()
    except FileNotFoundError:
        return {}, MISSING
    except OSError as exc:
        return {}, f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return {}, "not a regular file"
    if info.st_size > max_bytes:
        return {}, f"{info.st_size} bytes, over the {max_bytes}-byte limit for one report; not read"
    try:
        text = report.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return {}, f"cannot be read ({exc.strerror or exc})"
    sections = section_report(text)
    return sections, "" if sections else "no sections (no 'NAME:' header such as FINDINGS: or IMPRESSION:)"
