"""An R2Gen-format ``annotation.json`` -> the studies table and the split it carries.

The format (R2Gen, R2GenCMN, and any data set prepared for them): ``{"train": [...], "val":
[...], "test": [...]}``; each item holds ``id``, ``report``, ``image_path`` (a list of paths
relative to an image root) and ``split``; MIMIC-CXR's items also ``study_id`` and
``subject_id``. Each item is one row of the studies table (R2Gen's unit of training), its
``id`` the uid. ``report`` is the text the model learns: R2Gen's annotations hold FINDINGS
only, so it goes to the table's ``findings`` column (``text.target findings`` trains on it) and
``impression`` stays empty (flagged ``no_impression``). The list an item is in is its split;
stage 03 uses it as it is.

Views: where a projections table is given (``data.projections_csv``, columns ``filename`` and
``projection``, a ``filename`` being an ``image_path`` entry exactly as the annotation writes
it), the table decides, and images it lacks are ``unknown``. Otherwise the stated rule, R2Gen's
IU X-Ray convention: ``image_path[0]`` is the frontal view, ``image_path[1]`` the lateral, and
further images are ignored (their count is logged as a warning). An image's id in the table and
the image cache is its ``image_path`` entry.

Refused with ``AnnotationError`` (one line naming the file): a file that is not JSON or lacks
the three lists, an item without ``id``/``report``/``image_path`` or with a wrong type, an item
whose ``split`` disagrees with its list, an id (or a ``study_id``; a null one is none) in two
splits or twice, and an image path that is empty, absolute, leaves the image root or does not
exist there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath

import pandas as pd

from medexgen_lib.reports import COLUMNS
from medexgen_lib.splits import SPLITS, check_disjoint

log = logging.getLogger(__name__)

RULE = "annotation rule: image_path[0] frontal, [1] lateral"


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names it and the item."""


def read_annotation(annotation_file: str | os.PathLike, image_root: str | os.PathLike,
                    projections: str | os.PathLike | None = None
                    ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The studies table (one row per item, columns of ``reports.COLUMNS``) and the split
    (``{"train": [uid, ...], ...}``) of ``annotation_file``, images looked up under ``image_root``."""
    path, root = Path(annotation_file), Path(image_root)
    annotation = _load(path)
    if not root.is_dir():
        raise AnnotationError(f"image root {root} of annotation file {path} is not a folder; "
                              "set data.image_root")
    projection_of = _load_projections(Path(projections)) if projections else None
    source = str(projections) if projections else RULE
    rows, splits, ignored = [], {name: [] for name in SPLITS}, 0
    study_split: dict[str, str] = {}
    for name in SPLITS:
        for index, item in enumerate(annotation[name]):
            row, extra = _row(path, root, name, index, item, projection_of, source)
            ignored += extra
            study = str(row["uid"] if item.get("study_id") is None else item["study_id"])  # null: no study
            if study_split.setdefault(study, name) != name:
                raise AnnotationError(f"annotation file {path}: study {study} is in both "
                                      f"{study_split[study]} and {name}")
            rows.append(row)
            splits[name].append(row["uid"])
    try:
        check_disjoint(splits, f"annotation file {path}")
    except ValueError as exc:
        raise AnnotationError(str(exc)) from None
    if ignored:
        log.warning("%d image(s) beyond the first two of an item ignored (%s; give "
                    "data.projections_csv to choose views by table)", ignored, RULE)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs.update(malformed=[], ignored_images=ignored)
    log.info("read %d studies from %s (%s)", len(table), path,
             ", ".join(f"{name} {len(uids)}" for name, uids in splits.items()))
    return table, splits


def _load(path: Path) -> dict:
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"annotation file {path} does not exist; set data.annotation_file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"annotation file {path} cannot be read as JSON: {exc}") from None
    if not isinstance(annotation, dict) or not all(isinstance(annotation.get(n), list) for n in SPLITS):
        raise AnnotationError(f"annotation file {path} must hold 'train', 'val' and 'test' lists "
                              "of items (R2Gen format)")
    return annotation


def _row(path: Path, root: Path, split: str, index: int, item, projection_of: dict[str, str] | None,
         source: str) -> tuple[dict, int]:
    """One item as a studies-table row, and how many of its images the rule ignored."""
    where = f"annotation file {path}: {split}[{index}]"
    if not isinstance(item, dict):
        raise AnnotationError(f"{where} is not an object")
    missing = [key for key in ("id", "report", "image_path") if key not in item]
    if missing:
        raise AnnotationError(f"{where} lacks {', '.join(missing)}")
    uid, report, images = item["id"], item["report"], item["image_path"]
    if not isinstance(uid, (str, int)) or isinstance(uid, bool) or not str(uid).strip():
        raise AnnotationError(f"{where} has id {uid!r}, not a non-empty string")
    if not isinstance(report, str):
        raise AnnotationError(f"{where} (id {uid}) has a report that is not a string")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise AnnotationError(f"{where} (id {uid}) has an image_path that is not a list of paths")
    if item.get("split", split) != split:
        raise AnnotationError(f"{where} (id {uid}) says split {item['split']!r} but is in the {split} list")
    ignored = 0
    if projection_of is None:
        ignored = max(0, len(images) - 2)
        images = images[:2]
        projections = ["frontal", "lateral"][:len(images)]
    else:
        projections = [projection_of.get(p, "unknown") for p in images]
    paths = [str(_image_file(path, root, uid, p)) for p in images]
    uid = str(uid).strip()
    return {"uid": uid, "report_file": path.name, "findings": report, "impression": "",
            "indication": "", "comparison": "", "mesh_major": [], "mesh_minor": [],
            "image_ids": list(images), "image_paths": paths, "projections": projections,
            "projection_source": source if images and (projection_of is None or any(
                p in projection_of for p in images)) else "unknown", "n_images": len(images),
            "no_findings": not report.strip(), "no_impression": True, "no_image": not images,
            "image_missing": False}, ignored


def _image_file(path: Path, root: Path, uid, relative: str) -> Path:
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute():
        raise AnnotationError(f"annotation file {path}: id {uid} has image path {relative!r}, which is "
                              f"absolute; image_path entries are relative to the image root {root}")
    if not parts:
        raise AnnotationError(f"annotation file {path}: id {uid} has image path {relative!r}, "
                              "which names no file")
    if ".." in parts:
        raise AnnotationError(f"annotation file {path}: id {uid} has image path {relative!r}, "
                              "which leaves the image root")
    image = root.joinpath(*parts)
    if not image.is_file():
        raise AnnotationError(f"annotation file {path}: image {image} (id {uid}) does not exist")
    return image


def _load_projections(path: Path) -> dict[str, str]:
    """``filename`` (an ``image_path`` entry) -> ``frontal``/``lateral`` from a projections CSV."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"projections table {path} cannot be read: {exc}") from None
    missing = {"filename", "projection"} - set(table.columns)
    if missing:
        raise AnnotationError(f"projections table {path} lacks column(s) {sorted(missing)}; "
                              "expected filename,projection")
    return {str(f): str(p).strip().lower() for f, p in zip(table["filename"], table["projection"])}
