"""The phantom in MIMIC-CXR-JPG's and R2Gen's layouts, and the IU sample converted to R2Gen's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medexgen_lib.annotation import read_annotation
from medexgen_lib.mimic import METADATA_CSV, SPLIT_CSV, read_mimic
from medexgen_lib.phantom import _sample_studies
from medexgen_lib.phantom_layouts import iu_sample_to_annotation, main, write_phantom
from medexgen_lib.reports import MalformedReport

IU_R2GEN = Path(__file__).parent / "data" / "iuxray-sample-r2gen"


@pytest.fixture(scope="module")
def mimic_phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("layouts") / "mimic", "mimic", 200, 32, 3)


def test_mimic_layout_is_physionets_and_reads_back(mimic_phantom):
    for name in (SPLIT_CSV, METADATA_CSV):
        assert (mimic_phantom / name).read_bytes()[:2] == b"\x1f\x8b"  # gzip
    split = pd.read_csv(mimic_phantom / SPLIT_CSV, dtype=str)
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) == {"train", "validate", "test"}
    assert split.groupby("subject_id")["split"].nunique().max() == 1  # split by subject, as MIMIC's
    images = sorted(mimic_phantom.glob("files/p*/p*/s*/*.jpg"))
    assert len(images) == len(split)
    assert all(path.read_bytes()[:3] == b"\xff\xd8\xff" for path in images[:20])  # JPEG
    table, splits = read_mimic(mimic_phantom)
    assert len(table) == 200 and sum(map(len, splits.values())) == 200
    assert len(splits["test"]) > len(splits["val"]) > 0
    assert all("frontal" in p for p in table.projections)
    assert not table.image_missing.any()


def test_mimic_reports_come_in_mimics_shapes_and_state_what_was_drawn(mimic_phantom):
    texts = {path.stem: path.read_text() for path in mimic_phantom.glob("files/p*/p*/s*.txt")}
    assert len(texts) == 200 and all("FINAL REPORT" in t and "INDICATION:" in t for t in texts.values())
    for shape in ("WET READ:", "FINAL ADDENDUM", "___"):
        assert any(shape in t for t in texts.values()), shape
    without_findings = {uid for uid, t in texts.items() if "FINDINGS:" not in t}
    assert without_findings
    impression_first = [t for t in texts.values() if "FINDINGS:" in t and t.index("IMPRESSION:") < t.index("FINDINGS:")]
    assert impression_first
    table, _ = read_mimic(mimic_phantom)
    assert set(table.loc[table.no_findings, "uid"]) == without_findings
    assert not table.no_impression.any() and not table.attrs["malformed"]
    drawn = _sample_studies(200, np.random.default_rng(3))
    by_number = {50_000_000 + s.number * 97: s for s in drawn}
    for row in table.itertuples():  # the impression names exactly what was drawn
        study = by_number[int(row.uid[1:])]
        for finding in ("cardiomegaly", "effusion", "pneumothorax"):
            assert (finding in study.findings) == (finding in row.impression.lower()), (row.uid, finding)


def test_annotation_layout_is_r2gens(tmp_path):
    out = write_phantom(tmp_path / "r2gen", "annotation", 30, 32, 0)
    annotation = json.loads((out / "annotation.json").read_text())
    assert sum(len(annotation[s]) for s in ("train", "val", "test")) == 30
    item = annotation["train"][0]
    assert set(item) == {"id", "report", "image_path", "split"} and item["image_path"][0] == f"{item['id']}/0.png"
    table, splits = read_annotation(out / "annotation.json", out / "images")
    assert len(table) == 30 and not table.no_findings.any()
    assert Image.open(out / "images" / item["image_path"][0]).size == (32, 32)


@pytest.mark.reliability
def test_the_writer_refuses_a_folder_in_use_and_leaves_it_alone(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'out'} is not empty"):
        write_phantom(tmp_path / "out", "mimic", 3, 32, 0)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert main(["--layout", "annotation", "--out", str(tmp_path / "out"), "--studies", "3"]) == 1


def test_the_command_line_writes_a_layout(tmp_path):
    assert main(["--layout", "annotation", "--out", str(tmp_path / "a"), "--studies", "4", "--size", "32"]) == 0
    assert (tmp_path / "a" / "annotation.json").exists() and not (tmp_path / "a.partial").exists()


def test_memory_does_not_grow_with_the_number_of_studies(tmp_path):
    """Written study by study: 8x the studies (of 128 px images) must not raise the peak RSS by
    what keeping their pixels would (700 more images of 16 kB: 11 MB)."""
    script = ("import resource, sys\nfrom medexgen_lib.phantom_layouts import write_phantom\n"
              "write_phantom(sys.argv[1], 'mimic', int(sys.argv[2]), 128, 0)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks_kb = [int(subprocess.run([sys.executable, "-c", script, str(tmp_path / f"m{n}"), str(n)], check=True,
                                   capture_output=True, text=True).stdout) for n in (50, 400)]
    assert peaks_kb[1] - peaks_kb[0] < 5_000, peaks_kb


def test_the_committed_iu_sample_in_r2gen_format_is_what_the_converter_writes(tmp_path, iuxray_sample):
    out = iu_sample_to_annotation(iuxray_sample, tmp_path / "iu")
    committed = json.loads((IU_R2GEN / "annotation.json").read_text())
    assert json.loads((out / "annotation.json").read_text()) == committed
    original = json.loads((iuxray_sample / "annotation.json").read_text())
    for split in ("train", "val", "test"):  # R2Gen's items, verbatim
        assert committed[split] == original[split][:len(committed[split])]
    # Every image, not a few test ones: a mapping change (version 2 drew atelectasis and
    # granulomas) redraws train studies, which the committed copy must follow.
    stale = [relative for split in ("train", "val", "test") for item in committed[split]
             for relative in item["image_path"]
             if not np.array_equal(np.asarray(Image.open(out / "images" / relative)),
                                   np.asarray(Image.open(IU_R2GEN / "images" / relative)))]
    assert stale == []
    assert "CC BY-NC-ND 4.0" in (IU_R2GEN / "README.md").read_text()


@pytest.mark.reliability
def test_an_interrupted_writer_leaves_nothing_behind(tmp_path, monkeypatch):
    import medexgen_lib.phantom_layouts as layouts

    calls = []

    def failing_draw(*args):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("No space left on device")
        return original(*args)

    original = layouts._draw
    monkeypatch.setattr(layouts, "_draw", failing_draw)
    with pytest.raises(OSError, match="No space left"):
        write_phantom(tmp_path / "out", "mimic", 10, 32, 0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.reliability
def test_the_iu_sample_converter_keeps_a_folder_in_use_and_leaves_nothing_half_written(tmp_path, iuxray_sample):
    in_use = tmp_path / "in_use"
    in_use.mkdir()
    (in_use / "annotation.json").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{in_use} is not empty"):
        iu_sample_to_annotation(iuxray_sample, in_use)
    assert [p.name for p in in_use.iterdir()] == ["annotation.json"]
    assert (in_use / "annotation.json").read_text() == "mine"
    sample = tmp_path / "sample"
    shutil.copytree(iuxray_sample, sample)
    number = json.loads((sample / "annotation.json").read_text())["val"][0]["id"].split("_")[0].removeprefix("CXR")
    report = sample / "reports" / "ecgen-radiology" / f"{number}.xml"
    report.unlink()  # train's images are drawn before this report is needed
    with pytest.raises(MalformedReport, match=f"{report}: cannot be read") as raised:
        iu_sample_to_annotation(sample, tmp_path / "out", per_split=(4, 1, 1), size=32)
    assert len(str(raised.value).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_use", "sample"]  # no out/, no out.partial/
