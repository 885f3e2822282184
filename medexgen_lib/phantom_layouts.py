"""The phantom written in MIMIC-CXR-JPG's and R2Gen's layouts, so both sources run offline.

``write_phantom(out_dir, layout, studies, size, seed)`` draws the phantom's studies (the same
findings ``phantom.make_phantom_dataset`` draws for the seed) and writes them study by study, so
memory stays bounded (20,000 studies at 64 px hold only the list of what each study shows):

- ``mimic``: MIMIC-CXR-JPG 2.0.0 as PhysioNet ships it: ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``
  (JPEG, quality 95), ``mimic-cxr-2.0.0-split.csv.gz`` and ``-metadata.csv.gz`` (gzip) and
  free-text reports ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` in MIMIC's shapes: ``FINAL REPORT``,
  EXAMINATION / INDICATION / TECHNIQUE / COMPARISON, FINDINGS, IMPRESSION, ``___`` for
  de-identified words; about 8% with a WET READ on top, 5% with a FINAL ADDENDUM, 3% with the
  IMPRESSION first and 4% without FINDINGS. Frontal views are PA (or AP), laterals LATERAL (or
  LL); 3% of studies have an extra oblique (LAO) image, which readers leave out. Two studies per
  subject; the split (train / validate / test, 70 / 10 / 20%) is by subject, as MIMIC's.
- ``annotation``: R2Gen's format: ``annotation.json`` and ``images/<id>/0.png`` (frontal),
  ``1.png`` (lateral, where the study has one); ``report`` is the FINDINGS text; split 70 / 10 / 20%.

``iu_sample_to_annotation`` converts the IU X-Ray sample in ``tests/data`` to R2Gen's layout (its
R2Gen split and real reports; images drawn for each report's MeSH terms by the real-text
phantom's mapping, as the sample holds only 3 real radiographs, none of R2Gen's split).

    python -m medexgen_lib.phantom_layouts --layout mimic|annotation --out DIR --studies N --size S [--seed 0]
    python -m medexgen_lib.phantom_layouts --layout iu-sample --sample tests/data/iuxray-sample --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medexgen_lib.files import write_json
from medexgen_lib.phantom import PhantomStudy, _sample_studies, _write_report, draw_radiograph
from medexgen_lib.splits import SPLITS

log = logging.getLogger(__name__)

LAYOUTS = ("mimic", "annotation")
FRACTIONS = {"val": 0.1, "test": 0.2}  # the rest is train
SPLIT_CSV_NAME = {"train": "train", "val": "validate", "test": "test"}
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral",
                "LAO": "left anterior oblique"}


def write_phantom(out_dir: str | os.PathLike, layout: str, studies: int, size: int, seed: int) -> Path:
    """Write ``studies`` phantom studies of ``size`` px in ``layout`` (``mimic`` or ``annotation``)
    into ``out_dir``, which must not exist or be empty; built beside it and renamed into place,
    so an interrupted run leaves nothing at ``out_dir``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if studies < 1 or size < 32:
        raise ValueError(f"studies must be at least 1 and size at least 32 px, got {studies} and {size}")
    out = Path(out_dir)
    with _built_beside(out) as building:
        rng = np.random.default_rng(seed)
        sampled = _sample_studies(studies, rng)
        split_of = _split_by_group([(s.number - 1) // 2 if layout == "mimic" else s.number for s in sampled], seed)
        if layout == "mimic":
            _write_mimic(building, sampled, split_of, size, rng, np.random.default_rng([seed, 1]))
        else:
            _write_annotation(building, sampled, split_of, size, rng)
    log.info("phantom in the %s layout: %d studies at %d px in %s", layout, studies, size, out)
    return out


@contextlib.contextmanager
def _built_beside(out: Path) -> Iterator[Path]:
    """A new ``<out>.partial`` folder to write into, renamed to ``out`` (which must not exist or be
    empty) when the block completes and removed when it fails or is interrupted."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; the phantom is written only into a new or empty folder")
    building = out.with_name(out.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        yield building
        if out.exists():
            out.rmdir()
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _split_by_group(groups: list[int], seed: int) -> list[str]:
    """Each item's split, drawn per group (a MIMIC subject): 70 / 10 / 20% of the groups."""
    unique = sorted(set(groups))
    order = np.random.default_rng([seed, 2]).permutation(len(unique))
    n_test, n_val = round(len(unique) * FRACTIONS["test"]), round(len(unique) * FRACTIONS["val"])
    split_of_group = {}
    for rank, index in enumerate(order):
        split_of_group[unique[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [split_of_group[g] for g in groups]


def _draw(study: PhantomStudy, view: str, size: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(draw_radiograph(study.findings, view, size, rng), mode="L")


# --------------------------------------------------------------------------- MIMIC-CXR-JPG

def _write_mimic(root: Path, sampled: list[PhantomStudy], split_of: list[str], size: int,
                 rng: np.random.Generator, shapes: np.random.Generator) -> None:
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt", newline="") as split_file, \
            gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt", newline="") as meta_file:
        split_csv, meta_csv = csv.writer(split_file), csv.writer(meta_file)
        split_csv.writerow(["dicom_id", "study_id", "subject_id", "split"])
        meta_csv.writerow(METADATA_COLUMNS)
        for study, split in tqdm(list(zip(sampled, split_of)), desc="MIMIC-layout phantom", unit="study"):
            subject = str(10_000_000 + ((study.number - 1) // 2) * 433)
            study_id = str(50_000_000 + study.number * 97)
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
            (folder / f"s{study_id}").mkdir(parents=True, exist_ok=True)
            views = ["PA" if shapes.random() < 0.8 else "AP"]
            if study.has_lateral:
                views.append("LATERAL" if shapes.random() < 0.9 else "LL")
            if shapes.random() < 0.03:
                views.append("LAO")
            for k, view in enumerate(views):
                dicom = _dicom_id(study.number, k)
                kind = "lateral" if view in ("LATERAL", "LL") else "frontal"
                _draw(study, kind, size, rng).save(folder / f"s{study_id}" / f"{dicom}.jpg", quality=95)
                split_csv.writerow([dicom, study_id, subject, SPLIT_CSV_NAME[split]])
                meta_csv.writerow([dicom, subject, study_id, "CHEST (PA AND LAT)", view, size, size,
                                   21800101 + study.number % 28, "120000.000", "Chest 2 Views",
                                   VIEW_MEANING[view], "Erect"])
            text = _write_report(study, rng)
            (folder / f"s{study_id}.txt").write_text(mimic_report_text(text, shapes), encoding="utf-8")


def _dicom_id(number: int, k: int) -> str:
    digest = hashlib.sha1(f"medexgen-phantom:{number}:{k}".encode()).hexdigest()[:40]
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def mimic_report_text(sections: dict[str, str], shapes: np.random.Generator) -> str:
    """A phantom report (``FINDINGS``, ``IMPRESSION``, ``INDICATION``, ``COMPARISON``) as MIMIC-CXR
    writes reports, its shape drawn from ``shapes`` (see the module docstring)."""
    deid = {name: text.replace("XXXX", "___") for name, text in sections.items()}
    wet, addendum, impression_first, no_findings = (shapes.random() < p for p in (0.08, 0.05, 0.03, 0.04))
    body = [("EXAMINATION", "CHEST (PA AND LAT)"),
            ("INDICATION", deid["INDICATION"] or "___ year old with cough."),
            ("TECHNIQUE", "Chest PA and lateral"), ("COMPARISON", deid["COMPARISON"] or "None.")]
    main = [("FINDINGS", deid["FINDINGS"]), ("IMPRESSION", deid["IMPRESSION"])]
    if no_findings:
        main = main[1:]
    elif impression_first:
        main.reverse()
    lines = []
    if wet:
        lines += [f" WET READ: ___ ___ ___ {shapes.integers(1, 12)}:{shapes.integers(10, 60)} PM",
                  *_wrap(deid["IMPRESSION"], "  "), " " + "_" * 78]
    if addendum:
        lines += [" " * 33 + "FINAL ADDENDUM", " ADDENDUM:  The findings were discussed with Dr. ___ by "
                  "Dr. ___ on", " the telephone on ___ at 4:15 PM, 2 minutes after discovery.", " "]
    lines.append(" " * 33 + "FINAL REPORT")
    for name, text in body + main:
        if name in ("FINDINGS", "IMPRESSION"):
            lines += [f" {name}: ", " ", *_wrap(text, " "), " "]
        else:
            lines += [f" {name}:  {text}", " "]
    return "\n".join(lines) + "\n"


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, 78, initial_indent=indent, subsequent_indent=indent) or [indent]


# --------------------------------------------------------------------------- R2Gen annotation

def _write_annotation(root: Path, sampled: list[PhantomStudy], split_of: list[str], size: int,
                      rng: np.random.Generator) -> None:
    annotation: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for study, split in tqdm(list(zip(sampled, split_of)), desc="annotation-layout phantom", unit="study"):
        uid = study.image_ids[0].rsplit("-", 1)[0]  # CXR<n>_IM-<nnnn>, as R2Gen names IU studies
        (root / "images" / uid).mkdir(parents=True)
        names = ["0.png", "1.png"][:len(study.image_ids)]
        for name, view in zip(names, ("frontal", "lateral")):
            _draw(study, view, size, rng).save(root / "images" / uid / name)
        report = _write_report(study, rng)["FINDINGS"]
        annotation[split].append({"id": uid, "report": report,
                                  "image_path": [f"{uid}/{name}" for name in names], "split": split})
    write_json(root / "annotation.json", annotation)


def iu_sample_to_annotation(sample_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            per_split: tuple[int, int, int] = (48, 8, 16), size: int = 64, seed: int = 0) -> Path:
    """The IU X-Ray sample (``tests/data/iuxray-sample``) in R2Gen's layout: the first
    ``per_split`` items of each split of its R2Gen ``annotation.json`` (real reports, unchanged),
    ``images/<id>/0.png`` frontal and ``1.png`` lateral drawn for the report's MeSH terms
    (``realtext.findings_from_mesh``, one generator per study), and a README with the attribution.
    Written as ``write_phantom`` writes: into a new or empty ``out_dir``, all or nothing; a report
    that cannot be read is named (``MalformedReport``)."""
    from medexgen_lib.realtext import findings_from_mesh
    from medexgen_lib.reports import MalformedReport, parse_report

    sample, out = Path(sample_dir), Path(out_dir)
    source = json.loads((sample / "annotation.json").read_text())
    annotation: dict[str, list[dict]] = {}
    with _built_beside(out) as building:
        for split, count in zip(SPLITS, per_split):
            annotation[split] = source[split][:count]
            for item in annotation[split]:
                number = int(item["id"].split("_")[0].removeprefix("CXR"))
                study_rng = np.random.default_rng([seed, number])
                report = sample / "reports" / "ecgen-radiology" / f"{number}.xml"
                try:
                    terms = parse_report(report)["mesh_major"]
                except MalformedReport as exc:
                    raise MalformedReport(f"IU X-Ray sample report {report}: {exc}") from None
                findings, _ = findings_from_mesh(terms, study_rng)
                study = PhantomStudy(number=number, findings=findings)
                for relative, view in zip(item["image_path"], ("frontal", "lateral")):
                    (building / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
                    _draw(study, view, size, study_rng).save(building / "images" / relative)
        write_json(building / "annotation.json", annotation)
        (building / "README.md").write_text(
            _IU_README.format(counts=" / ".join(str(len(annotation[s])) for s in SPLITS), size=size, seed=seed),
            encoding="utf-8")
    return out


_IU_README = """# The IU X-Ray sample in R2Gen's format, for tests

Written by `python -m medexgen_lib.phantom_layouts --layout iu-sample --sample tests/data/iuxray-sample
--out tests/data/iuxray-sample-r2gen` (`phantom_layouts.iu_sample_to_annotation`, size {size}, seed {seed}).

| path | what |
|---|---|
| `annotation.json` | the first items of each split of `../iuxray-sample/annotation.json` (R2Gen's split file reduced to that sample): {counts} train / val / test, reports unchanged |
| `images/<id>/0.png`, `1.png` | synthetic radiographs (frontal, lateral), drawn by MedExGen's phantom for each report's MeSH major terms (`realtext.findings_from_mesh`): the sample holds only 3 real radiographs, none of a study in R2Gen's split |

The reports are real data from the Indiana University chest X-ray collection (Open-i, NLMCXR),
licensed CC BY-NC-ND 4.0 by Indiana University / NLM (see `../iuxray-sample/README.md`); they are
copied verbatim. The images are not from the collection.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib.phantom_layouts", description=__doc__.split("\n")[0])
    parser.add_argument("--layout", required=True, choices=[*LAYOUTS, "iu-sample"])
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", help="the IU X-Ray sample folder (--layout iu-sample)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.layout == "iu-sample":
            if not args.sample:
                parser.error("--layout iu-sample needs --sample")
            print(iu_sample_to_annotation(args.sample, args.out, size=args.size, seed=args.seed))
        else:
            print(write_phantom(args.out, args.layout, args.studies, args.size, args.seed))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
