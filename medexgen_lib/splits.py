"""Study-level train/val/test splits: seeded and stratified, or R2Gen's published file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from medexgen_lib.files import read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# In processed/: the split a data source carries (data.source annotation or mimic), written by stage 01.
SOURCE_SPLIT_FILE = "source_split.json"
SOURCES_WITH_SPLIT = ("annotation", "mimic")


def usable_studies(table: pd.DataFrame, texts: pd.Series, require_findings: bool = False
                   ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Studies with target text and at least one image on disk, and why others were left out."""
    has_text = texts.str.len() > 0
    has_image = table["image_paths"].map(lambda ps: any(p for p in ps))
    keep = has_text & has_image
    dropped = {"no_target_text": int((~has_text).sum()),
               "no_image_on_disk": int((has_text & ~has_image).sum())}
    if require_findings:
        no_findings = keep & table["no_findings"]
        dropped["no_findings"] = int(no_findings.sum())
        keep &= ~table["no_findings"]
    return table[keep], dropped


def is_abnormal(mesh_major: list[str]) -> bool:
    """A study is normal when its only MeSH major term is ``normal``."""
    return list(mesh_major) != ["normal"]


def make_splits(table: pd.DataFrame, seed: int, val_fraction: float = 0.1,
                test_fraction: float = 0.2) -> dict[str, list[str]]:
    """Split study uids, stratified by normal/abnormal; every uid in exactly one split."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be "
                         "in [0, 1) and leave some training data")
    duplicated = sorted(set(table.loc[table["uid"].duplicated(), "uid"]), key=_uid_key)
    if duplicated:
        raise ValueError(f"the studies table has {len(duplicated)} uid(s) on more than one row, "
                         f"e.g. {duplicated[:3]}; a study must be in exactly one split "
                         "(read_reports keeps one row per uid)")
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    abnormal = table["mesh_major"].map(is_abnormal)
    for group in (False, True):
        uids = sorted(table.loc[abnormal == group, "uid"])
        uids = [uids[i] for i in rng.permutation(len(uids))]
        n_test = round(len(uids) * test_fraction)
        n_val = round(len(uids) * val_fraction)
        splits["test"] += uids[:n_test]
        splits["val"] += uids[n_test:n_test + n_val]
        splits["train"] += uids[n_test + n_val:]
    check_disjoint(splits, "make_splits")
    return {name: sorted(uids, key=_uid_key) for name, uids in splits.items()}


def check_disjoint(splits: dict[str, list[str]], source: str) -> None:
    """Raise ``ValueError`` naming the first uid listed twice (in one split or in two):
    a study in train and test would leak its report into the test score."""
    seen: dict[str, str] = {}
    for name in SPLITS:
        for uid in splits[name]:
            if uid in seen:
                where = f"twice in {name}" if seen[uid] == name else f"in both {seen[uid]} and {name}"
                raise ValueError(f"{source}: study {uid} is {where}")
            seen[uid] = name


def splits_from_annotation(annotation_file: str | os.PathLike, table: pd.DataFrame,
                           ids_are_uids: bool = False) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Splits from R2Gen's ``annotation.json`` (ids like ``CXR1573_IM-0374``, whose uid is
    ``CXR1573``; with ``ids_are_uids`` each id is a uid as it is, as in ``SOURCE_SPLIT_FILE``).

    Studies listed there but absent from ``table`` are counted, not invented.
    """
    path = Path(annotation_file)
    try:
        annotation = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read split file {path}: {exc}") from None
    if not isinstance(annotation, dict) or not set(SPLITS) <= set(annotation):
        raise ValueError(f"split file {path} must hold 'train', 'val' and 'test' lists (R2Gen format)")
    known = set(table["uid"])
    splits, missing = {}, {}
    for name in SPLITS:
        uids = [str(entry["id"]) if ids_are_uids else str(entry["id"]).split("_")[0]
                for entry in annotation[name]]
        splits[name] = sorted({u for u in uids if u in known}, key=_uid_key)
        missing[name] = len(set(uids) - known)
    check_disjoint(splits, f"split file {path}")
    return splits, missing


def write_source_split(splits: dict[str, list[str]], path: str | os.PathLike) -> Path:
    """Save a data source's own split (stage 01) in R2Gen's shape, ``{"train": [{"id": uid,
    "split": "train"}, ...], ...}``, for stage 03's ``splits_from_annotation(..., ids_are_uids=True)``."""
    return write_json(path, {name: [{"id": uid, "split": name} for uid in splits[name]]
                             for name in SPLITS})


def write_splits(splits: dict[str, list[str]], path: str | os.PathLike, meta: dict) -> Path:
    """Save ``{"train": [...], "val": [...], "test": [...], "meta": {...}}`` atomically."""
    return write_json(path, {**splits, "meta": meta})


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """The splits written by notebook 03."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file {path} does not exist; run notebook 03_preprocessing first")
    data = read_json(path)
    splits = {name: data[name] for name in SPLITS}
    check_disjoint(splits, f"split file {path}")
    return splits


def _uid_key(uid: str):
    digits = uid.removeprefix("CXR")
    return (0, int(digits), "") if digits.isdecimal() else (1, 0, uid)  # int() refuses "²"
