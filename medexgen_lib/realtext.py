"""The real-text phantom: phantom radiographs drawn for real Open-i reports, from what they state.

The phantom set (``phantom.py``) writes template reports for what it draws. This module does the
reverse for a folder of real report XMLs (IU X-Ray, as ``NLMCXR_reports.tgz`` unpacks): it reads
each report's MeSH major terms, maps them to phantom findings and draws every image the report
lists with ``phantom.draw_radiograph``, so the real-data path (``data.source folder``) trains and
evaluates offline on radiologists' wording. The XMLs are copied unmodified.

Mapping (``findings_from_mesh``; a term reads ``Head/qualifier/...``, compared without case):

=================================================================  ==================================
MeSH major term (head)                                             drawn finding (detail)
=================================================================  ==================================
Cardiomegaly; Cardiac Shadow with qualifier ``enlarged``           cardiomegaly
Pleural Effusion                                                   effusion (side)
Pneumothorax                                                       pneumothorax (side)
Hydropneumothorax                                                  effusion and pneumothorax (side)
Nodule -> nodule, Mass -> mass                                     nodule (side-zone-kind)
Consolidation, Opacity, Pneumonia, Infiltrate, Airspace Disease    consolidation (side-zone)
Pulmonary Edema, Pulmonary Congestion                              edema
Pulmonary Atelectasis                                              atelectasis (side)
Calcified Granuloma, Granuloma, Granulomatous Disease              granuloma (side-zone)
``normal``, and every other term                                   nothing
=================================================================  ==================================

- Hedged: a term with the qualifier ``borderline`` is not drawn (``Cardiomegaly/borderline``).
- Not in the lung: a nodule, consolidation or granuloma term whose qualifiers name another site
  (``NON_LUNG_SITES``: ribs, mediastinum, heart, breast, pleura, paratracheal, ...) is not drawn
  (``Mass/breast/large``, ``Opacity/ribs/anterior``).
- Side: ``left``, ``right``, ``bilateral`` (both left and right: bilateral); else implied by the
  site: ``lingula`` and ``retrocardiac`` -> left, ``middle lobe`` -> right; else ``diffuse``,
  ``scattered``, ``multilobar`` -> bilateral. Terms for the same finding pool their sides (a
  left and a right term: bilateral). A finding no term gives a side gets a random left/right
  (seeded), listed in the truth file's ``guessed``.
- Zone (nodule, consolidation, granuloma): ``upper lobe``, ``apex`` -> upper; ``lower lobe``,
  ``base``, ``middle lobe``, ``lingula``, ``retrocardiac``, ``costophrenic angle`` -> lower; the
  first term that gives one decides. Otherwise a nodule's or granuloma's zone is random (seeded,
  ``guessed``) and a consolidation is drawn lower (where most are). Atelectasis is always drawn
  at the lung base (of the 307 atelectasis terms of the shared reports, 239 name a lower zone,
  55 none, 13 an upper one).
- Kind: a Mass term makes the nodule a mass (drawn larger). ``multiple`` is not drawn: a
  granuloma is one dot per side.

Images: ``<out>/images/<image id>.png``, frontal or lateral by the projections table (the
bundled whole-collection table by default, as ``data.source folder`` uses); an image the table
lacks is drawn frontal when its study has no frontal image, else lateral, and counted. Each
study is drawn from its own generator (seed, uid), so a subset draws the same pixels as the
whole folder. ``<out>/reports/realtext_findings.json`` holds what was drawn per study
(``load_truth``); ``stated_findings`` scores generated reports against it. A study whose XML
lists no image is kept (copied, nothing drawn) and counted.

    python -m medexgen_lib.realtext --reports DIR --out DATA [--size 64] [--seed 0]
        [--annotation r2gen_annotation_trainval.json --dev-split ANNOTATION_OUT [--val-studies 300]]
    python -m medexgen_lib run --profile full -p data.source folder -p paths.data_dir DATA \\
        -p split.annotation_file ANNOTATION_OUT ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from medexgen_lib.files import replace_dir, write_json
from medexgen_lib.labeler import MENTIONS, POSITIVE, SUPPORT_DEVICES, label_report
from medexgen_lib.phantom import FINDINGS, REAL_TEXT_FINDINGS, draw_radiograph
from medexgen_lib.reports import BUNDLED_PROJECTIONS, read_reports
from medexgen_lib.splits import SPLITS, check_disjoint

log = logging.getLogger(__name__)

MAPPING_VERSION = "3"  # bump whenever the mapping below changes: it decides what is drawn
TRUTH_FILE = "realtext_findings.json"  # next to the copied XMLs, in <out>/reports/
REPORTS_SUBDIR = "ecgen-radiology"

TERM_FINDINGS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly",),
    "pleural effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "hydropneumothorax": ("effusion", "pneumothorax"),
    "nodule": ("nodule",), "mass": ("nodule",),
    "consolidation": ("consolidation",), "opacity": ("consolidation",),
    "pneumonia": ("consolidation",), "infiltrate": ("consolidation",),
    "airspace disease": ("consolidation",),
    "pulmonary edema": ("edema",), "pulmonary congestion": ("edema",),
    "pulmonary atelectasis": ("atelectasis",),
    "calcified granuloma": ("granuloma",), "granuloma": ("granuloma",),
    "granulomatous disease": ("granuloma",),
}
DRAWN = FINDINGS + REAL_TEXT_FINDINGS  # every finding a report can have drawn
HEDGES = {"borderline"}
NON_LUNG_SITES = {"ribs", "mediastinum", "heart", "breast", "pleura", "paratracheal", "supracardiac",
                  "adipose tissue", "thoracic vertebrae", "spine", "sternum", "clavicle", "shoulder",
                  "humerus", "abdomen", "trachea", "aorta", "neck"}
SIDED = ("effusion", "pneumothorax", "nodule", "consolidation", "atelectasis", "granuloma")
ZONED = ("nodule", "granuloma")  # a zone drawn at random when no term names one
IN_LUNG = ("nodule", "consolidation", "granuloma")  # not drawn when a term names another site
_SITE_SIDE = {"lingula": "left", "retrocardiac": "left", "middle lobe": "right"}
_SPREAD = {"diffuse", "scattered", "multilobar"}  # no side named: both lungs
_ZONE = {"upper lobe": "upper", "apex": "upper", "lower lobe": "lower", "base": "lower",
         "middle lobe": "lower", "lingula": "lower", "retrocardiac": "lower",
         "costophrenic angle": "lower"}
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# Drawn finding -> the labeler's observations that state it.
STATED_AS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",), "effusion": ("Pleural Effusion",),
    "nodule": ("Lung Lesion",), "consolidation": ("Consolidation", "Lung Opacity", "Pneumonia"),
    "pneumothorax": ("Pneumothorax",), "edema": ("Edema",),
    "atelectasis": ("Atelectasis",), "granuloma": ("Granuloma",),
}
POOLED = ("cardiomegaly", "effusion", "nodule", "consolidation")


# --------------------------------------------------------------------------- mapping

def findings_from_mesh(terms: list[str], rng: np.random.Generator) -> tuple[dict[str, str], list[str]]:
    """The phantom findings a report's MeSH major terms state (see the module docstring), in
    ``draw_radiograph``'s format, and the findings whose side or zone was drawn at random."""
    found: dict[str, dict] = {}
    for term in terms:
        parts = [part.strip().lower() for part in term.split("/")]
        head, qualifiers = parts[0], parts[1:]
        names = _term_findings(head, set(qualifiers))
        for name in names:
            entry = found.setdefault(name, {"sides": set(), "zone": "", "mass": False})
            entry["sides"] |= _term_sides(qualifiers)
            entry["zone"] = entry["zone"] or next((_ZONE[q] for q in qualifiers if q in _ZONE), "")
            entry["mass"] |= head == "mass"
    findings, guessed = {}, []
    for name in DRAWN:  # a fixed order, so the random fallbacks are drawn reproducibly
        if name not in found:
            continue
        entry = found[name]
        if name not in SIDED:
            findings[name] = ""
            continue
        sides, zone = entry["sides"], entry["zone"]
        if not sides:
            sides = {str(rng.choice(["left", "right"]))}
        if name in ZONED and not zone:
            zone = str(rng.choice(["upper", "lower"]))
        if not entry["sides"] or (name in ZONED and not entry["zone"]):
            guessed.append(name)
        side = "bilateral" if len(sides) == 2 else next(iter(sides))
        if name == "nodule":
            findings[name] = f"{side}-{zone}-{'mass' if entry['mass'] else 'nodule'}"
        elif name == "consolidation":
            findings[name] = f"{side}-{zone or 'lower'}"
        elif name == "granuloma":
            findings[name] = f"{side}-{zone}"
        else:
            findings[name] = side
    return findings, guessed


def _term_findings(head: str, qualifiers: set[str]) -> tuple[str, ...]:
    if qualifiers & HEDGES:
        return ()
    if head == "cardiac shadow":
        return ("cardiomegaly",) if "enlarged" in qualifiers else ()
    names = TERM_FINDINGS.get(head, ())
    if set(IN_LUNG) & set(names) and qualifiers & NON_LUNG_SITES:
        return ()
    return names


def _term_sides(qualifiers: list[str]) -> set[str]:
    named = {q for q in qualifiers if q in ("left", "right")}
    if "bilateral" in qualifiers:
        named = {"left", "right"}
    if not named:
        named = {_SITE_SIDE[q] for q in qualifiers if q in _SITE_SIDE}
    if not named and _SPREAD & set(qualifiers):
        named = {"left", "right"}
    return named


# --------------------------------------------------------------------------- drawing

def draw_images_for_reports(reports_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            image_size: int = 64, seed: int = 0,
                            projections: str | os.PathLike | pd.DataFrame | None = None) -> dict:
    """Copy every report XML under ``reports_dir`` to ``<out>/reports/ecgen-radiology/`` and
    draw each listed image into ``<out>/images/`` from its report's MeSH major terms.

    ``projections``: a Kaggle-format table (``uid,filename,projection``), by default the
    bundled whole-collection table. ``<out>/images`` and ``<out>/reports`` must be absent or
    empty; everything is written in a staging folder under ``out_dir`` and renamed into place
    at the end, so an interrupted run leaves nothing half-written. Returns counts (also saved
    in the truth file). Deterministic by seed.
    """
    if image_size < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {image_size}")
    reports_dir, out = Path(reports_dir), Path(out_dir)
    if not reports_dir.is_dir():
        raise FileNotFoundError(f"reports folder {reports_dir} does not exist")
    files = sorted(reports_dir.rglob("*.xml"))
    if not files:
        raise ValueError(f"reports folder {reports_dir} holds no *.xml report")
    clash = _first_duplicate([path.name for path in files])
    if clash:
        raise ValueError(f"reports folder {reports_dir} holds two reports named {clash}; they "
                         f"would overwrite each other in {REPORTS_SUBDIR}/")
    for target in (out / "images", out / "reports"):
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f"{target} is not empty; choose an empty output folder")
    started = time.perf_counter()
    table = read_reports(reports_dir, projections=BUNDLED_PROJECTIONS if projections is None
                         else projections)
    staging = out / ".realtext-staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / "reports" / REPORTS_SUBDIR).mkdir(parents=True)
    try:
        for path in files:
            shutil.copyfile(path, staging / "reports" / REPORTS_SUBDIR / path.name)
        studies, counts = _draw_studies(table, staging / "images", image_size, seed)
        summary = {"reports": len(files), "studies": len(table),
                   "malformed": len(table.attrs.get("malformed", [])),
                   "duplicate_uids": len(table.attrs.get("duplicate_uids", [])), **counts,
                   "seconds": round(time.perf_counter() - started, 1)}
        write_json(staging / "reports" / TRUTH_FILE,
                   {"mapping_version": MAPPING_VERSION, "seed": seed, "image_size": image_size,
                    "source": str(reports_dir), "summary": summary, "studies": studies})
        out.mkdir(parents=True, exist_ok=True)
        for name in ("images", "reports"):
            replace_dir(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("real-text phantom: %d studies, %d images (%d with a drawn finding) in %s, %.1f s",
             summary["studies"], summary["images"], summary["with_drawn_finding"], out,
             summary["seconds"])
    return summary


def _draw_studies(table: pd.DataFrame, images_dir: Path, image_size: int, seed: int
                  ) -> tuple[list[dict], dict]:
    counts = {"no_images": 0, "images": 0, "frontal": 0, "lateral": 0, "unknown_projection": 0,
              "images_listed_twice": 0, "refused_image_ids": 0, "with_drawn_finding": 0,
              "findings": {name: 0 for name in DRAWN}, "guessed": {name: 0 for name in SIDED}}
    drawn_ids: set[str] = set()
    studies = []
    for row in tqdm(table.itertuples(index=False), total=len(table), desc="real-text phantom",
                    unit="study"):
        rng = np.random.default_rng([seed, zlib.crc32(row.uid.casefold().encode())])
        findings, guessed = findings_from_mesh(list(row.mesh_major), rng)
        views = _views(list(row.projections))
        images = {}
        for image_id, view, known in zip(row.image_ids, views, row.projections):
            if not _IMAGE_ID.fullmatch(image_id):
                log.warning("report %s: image id %r is not a plain file name; not drawn",
                            row.report_file, image_id)
                counts["refused_image_ids"] += 1
                continue
            if image_id in drawn_ids:
                counts["images_listed_twice"] += 1
                continue
            pixels = draw_radiograph(findings, view, image_size, rng)
            Image.fromarray(pixels).save(images_dir / f"{image_id}.png")
            drawn_ids.add(image_id)
            images[image_id] = view
            counts[view] += 1
            counts["unknown_projection"] += known not in ("frontal", "lateral")
        counts["images"] += len(images)
        counts["no_images"] += not row.image_ids
        counts["with_drawn_finding"] += bool(findings)
        for name in findings:
            counts["findings"][name] += 1
        for name in guessed:
            counts["guessed"][name] += 1
        studies.append({"uid": row.uid, "report_file": row.report_file, "findings": findings,
                        "guessed": guessed, "mesh_major": list(row.mesh_major), "images": images})
    return studies, counts


def _views(projections: list[str]) -> list[str]:
    """The drawn view per image: the table's, else frontal while the study has none."""
    has_frontal = "frontal" in projections
    views = []
    for projection in projections:
        if projection in ("frontal", "lateral"):
            views.append(projection)
        else:
            views.append("lateral" if has_frontal else "frontal")
            has_frontal = True
    return views


def _first_duplicate(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""


def load_truth(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """uid -> drawn findings from ``realtext_findings.json`` (or the reports folder holding it);
    a warning where it was drawn with another ``MAPPING_VERSION``."""
    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        truth = {study["uid"]: dict(study["findings"]) for study in data["studies"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the real-text phantom's truth file {path}: {exc}") from None
    # The writer writes a string; a hand-made file's number 3 is the same version 3.
    version = data.get("mapping_version")
    if version is None or str(version) != MAPPING_VERSION:
        drawn = "no mapping version" if version is None else f"mapping version {version}"
        log.warning("%s was drawn with %s and this code draws version %s: its "
                    "images are not those a folder drawn now holds (redraw it with python -m "
                    "medexgen_lib.realtext to compare with results of version %s)", path,
                    drawn, MAPPING_VERSION, MAPPING_VERSION)
    return truth


# --------------------------------------------------------------------------- dev split

DEV_VAL_STUDIES = 300  # studies of R2Gen's train that the development split validates on


def refuse_same_file(annotation_file: str | os.PathLike, out_file: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``out_file`` is ``annotation_file`` (the same file, or the same
    path once resolved): writing the split there would overwrite the annotation."""
    annotation, out = Path(annotation_file), Path(out_file)
    try:
        same = annotation.resolve() == out.resolve() or (
            annotation.exists() and out.exists() and os.path.samefile(annotation, out))
    except OSError:
        same = False
    if same:
        raise ValueError(f"--dev-split {out} is the annotation file {annotation}; writing the split "
                         "there would overwrite it: name another file")


def write_dev_split(annotation_file: str | os.PathLike, out_file: str | os.PathLike,
                    seed: int = 0, val_studies: int = DEV_VAL_STUDIES) -> dict[str, list[str]]:
    """An R2Gen-format split file for development: R2Gen's val (296 studies) as the test split,
    ``val_studies`` studies of R2Gen's train (seeded) as val, the rest of its train as train. A
    ``test`` list in the input (R2Gen's held-out split) is left out. Returns the study uids per
    split."""
    path = Path(annotation_file)
    refuse_same_file(path, out_file)
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read annotation file {path}: {exc}") from None
    if not isinstance(annotation, dict) or not all(
            isinstance(annotation.get(name), list) for name in ("train", "val")):
        raise ValueError(f"annotation file {path} must hold 'train' and 'val' lists (R2Gen format)")
    if "test" in annotation:
        log.info("annotation file %s has a test list; the development split leaves it out", path)
    by_uid: dict[str, dict[str, list[dict]]] = {"train": {}, "val": {}}
    for name in ("train", "val"):
        for entry in annotation[name]:
            if not isinstance(entry, dict) or not str(entry.get("id", "")).strip():
                raise ValueError(f"annotation file {path}: an entry of '{name}' has no id: {entry!r:.80}")
            by_uid[name].setdefault(str(entry["id"]).split("_")[0], []).append(entry)
    train_uids = sorted(by_uid["train"], key=_uid_number)
    if not 0 < val_studies < len(train_uids):
        raise ValueError(f"annotation file {path}: {len(train_uids)} training studies cannot give "
                         f"{val_studies} to val and keep some for training")
    order = np.random.default_rng(seed).permutation(len(train_uids))
    chosen = {"train": sorted((train_uids[i] for i in order[val_studies:]), key=_uid_number),
              "val": sorted((train_uids[i] for i in order[:val_studies]), key=_uid_number),
              "test": sorted(by_uid["val"], key=_uid_number)}
    check_disjoint(chosen, f"annotation file {path}")
    source = {"train": by_uid["train"], "val": by_uid["train"], "test": by_uid["val"]}
    written = {name: [{**entry, "split": name} for uid in chosen[name] for entry in source[name][uid]]
               for name in SPLITS}
    write_json(out_file, written)
    log.info("development split %s: %s studies", out_file,
             " / ".join(f"{len(chosen[name])} {name}" for name in SPLITS))
    return chosen


def _uid_number(uid: str) -> tuple:
    digits = uid.removeprefix("CXR")
    return (0, int(digits), "") if digits.isdecimal() else (1, 0, uid)


# --------------------------------------------------------------------------- scoring

def stated_findings(predictions: Mapping[str, str], truth: Mapping[str, Mapping[str, str]],
                    uncertain_as_positive: bool = False) -> dict:
    """Whether reports state what was drawn: per drawn finding (``STATED_AS``: the labeler's
    observations that state it), recall (drawn studies whose report states it) and precision
    (reports stating it whose study has it drawn), pooled over ``POOLED``; and, of the studies
    with a drawn finding, how many got a report stating none of the drawn findings' observations
    (``drawn_missed_studies``) and how many a report stating no finding at all (support devices
    aside: ``drawn_finding_free_studies``). ``predictions``: uid -> report; every uid must be in
    ``truth`` (uid -> drawn findings, ``load_truth``). A rate with nothing to count is None."""
    missing = [uid for uid in predictions if uid not in truth]
    if missing:
        raise ValueError(f"{len(missing)} predicted stud(ies) have no drawn truth, e.g. {missing[:3]}")
    accepted = {POSITIVE, "uncertain"} if uncertain_as_positive else {POSITIVE}
    observations = [o for o in MENTIONS if o != SUPPORT_DEVICES]
    hits = {name: 0 for name in DRAWN}
    drawn = dict(hits)
    said = dict(hits)
    drawn_studies = missed = finding_free = 0
    for uid, report in predictions.items():
        labels = label_report(report)
        stated = {name for name in DRAWN
                  if any(labels.get(o) in accepted for o in STATED_AS[name])}
        expected = set(truth[uid]) & set(DRAWN)
        for name in DRAWN:
            drawn[name] += name in expected
            said[name] += name in stated
            hits[name] += name in expected and name in stated
        if expected:
            drawn_studies += 1
            missed += not stated
            finding_free += not any(labels.get(o) in accepted for o in observations)
    out: dict = {"drawn_studies": drawn_studies, "drawn_missed_studies": missed,
                 "drawn_finding_free_studies": finding_free}
    for name in DRAWN:
        out[f"drawn_{name}"] = drawn[name]
        out[f"drawn_{name}_hits"] = hits[name]
        out[f"drawn_{name}_stated"] = said[name]
        out[f"drawn_{name}_recall"] = _rate(hits[name], drawn[name])
        out[f"drawn_{name}_precision"] = _rate(hits[name], said[name])
    pooled = [sum(counts[name] for name in POOLED) for counts in (hits, drawn, said)]
    out["drawn_recall"] = _rate(pooled[0], pooled[1])
    out["drawn_precision"] = _rate(pooled[0], pooled[2])
    return out


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """``python -m medexgen_lib.realtext``: draw the real-text phantom, optionally write a
    development split; prints the counts."""
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib.realtext",
                                     description="draw phantom radiographs for real Open-i report XMLs")
    parser.add_argument("--reports", required=True, help="folder of report XMLs (any depth)")
    parser.add_argument("--out", required=True, help="data folder to write (paths.data_dir)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawing and the split")
    parser.add_argument("--projections", help="Kaggle-format projections table (default: bundled)")
    parser.add_argument("--annotation", help="R2Gen annotation file with train and val lists")
    parser.add_argument("--dev-split", help="write the development split (R2Gen format) here: R2Gen's "
                        "val as test, --val-studies of its train as val, the rest as train")
    parser.add_argument("--val-studies", type=int, default=DEV_VAL_STUDIES,
                        help=f"studies of R2Gen's train the development split validates on "
                             f"(default {DEV_VAL_STUDIES})")
    args = parser.parse_args(argv)
    if bool(args.annotation) != bool(args.dev_split):
        parser.error("--annotation and --dev-split go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.dev_split:
            refuse_same_file(args.annotation, args.dev_split)
        summary = draw_images_for_reports(args.reports, args.out, args.size, args.seed,
                                          args.projections)
        print(json.dumps(summary, indent=1))
        if args.dev_split:
            splits = write_dev_split(args.annotation, args.dev_split, args.seed, args.val_studies)
            truth = load_truth(Path(args.out) / "reports")
            for name in SPLITS:
                present = [uid for uid in splits[name] if uid in truth]
                print(f"{name}: {len(splits[name])} studies in the split file, {len(present)} in "
                      f"{args.out}, {sum(bool(truth[u]) for u in present)} with a drawn finding")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
