"""The XML reader on the real IU X-Ray sample, on phantom data and on hostile files."""

import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medexgen_lib.acquisition import AcquisitionError, acquire, build_studies_table
from medexgen_lib.preprocess import run_preprocessing
from medexgen_lib.reports import (BUNDLED_PROJECTIONS, load_studies_table, read_reports,
                                  write_studies_table)


@pytest.fixture(scope="module")
def sample_table(iuxray_sample):
    return read_reports(iuxray_sample / "reports", iuxray_sample / "images",
                        iuxray_sample / "indiana_projections.csv")


def test_reproduces_every_figure_of_the_sample_readme(sample_table):
    t = sample_table
    has_findings, has_impression = t.findings != "", t.impression != ""
    assert len(t) == 397
    assert has_findings.sum() == 339
    assert has_impression.sum() == 394
    assert (has_findings | has_impression).sum() == 394
    assert t.n_images.sum() == 754
    assert t.no_image.sum() == 10
    by_count = Counter(t.n_images)
    assert [by_count[k] for k in range(6)] == [10, 46, 318, 21, 1, 1]
    assert (t.mesh_major.map(lambda terms: terms == ["normal"])).sum() == 139
    assert (has_findings & (t.n_images >= 2)).sum() == 290


def test_sample_projections_paths_and_flags(sample_table):
    t = sample_table.set_index("uid")
    assert Counter(p for ps in t.projections for p in ps) == {"frontal": 390, "lateral": 364}
    with_images = t.n_images > 0
    assert t.projection_source[with_images].str.endswith("iuxray-sample/indiana_projections.csv").all()
    assert (t.projection_source[~with_images] == "unknown").all()
    study3 = t.loc["CXR3"]
    frontal = study3.image_ids.index("CXR3_IM-1384-1001")
    assert study3.projections[frontal] == "frontal"
    assert study3.image_paths[frontal].endswith("CXR3_IM-1384-1001.png")
    assert study3.image_missing  # its lateral is not in the sample
    assert "XXXX" in t.loc["CXR1003"].impression
    assert t.loc["CXR1003"].mesh_major[0] == "Density/retrocardiac"


def test_without_projection_table_projection_is_unknown(iuxray_sample):
    t = read_reports(iuxray_sample / "reports")
    assert set(p for ps in t.projections for p in ps) == {"unknown"}
    assert (t.image_paths.map(lambda ps: all(p == "" for p in ps))).all()


def test_bundled_projections_table_covers_every_image_of_the_real_sample(iuxray_sample):
    t = read_reports(iuxray_sample / "reports", projections=BUNDLED_PROJECTIONS)
    views = Counter(p for ps in t.projections for p in ps)
    assert views["unknown"] == 0 and views["frontal"] + views["lateral"] == 754
    assert set(t.projection_source[t.n_images > 0]) == {"bundled IU X-Ray table"}


def test_a_built_wheel_carries_the_bundled_table_and_its_readme(tmp_path):
    """A non-editable install gets the table (package data), with the README that attributes it."""
    pytest.importorskip("setuptools", reason="builds the wheel offline with the venv's setuptools")
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "medexgen_lib", source / "medexgen_lib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("medexgen-*.whl")))
    folder = BUNDLED_PROJECTIONS.relative_to(root).parent.as_posix()
    assert wheel.read(f"{folder}/indiana_projections.csv") == BUNDLED_PROJECTIONS.read_bytes()
    assert "CC BY-NC-ND 4.0" in wheel.read(f"{folder}/README.md").decode()


def test_bundled_table_maps_study_1s_irregular_image_ids():
    from medexgen_lib.reports import _load_projections

    mapping = _load_projections(BUNDLED_PROJECTIONS)
    assert mapping["CXR1_1_IM-0001-4001"] == "frontal" and mapping["CXR1_1_IM-0001-3001"] == "lateral"
    assert mapping["CXR3_IM-1384-1001"] == "frontal"


def test_phantom_is_read_by_the_same_reader(phantom_dir):
    t = read_reports(phantom_dir / "reports", phantom_dir / "images",
                     phantom_dir / "reports" / "indiana_projections.csv")
    assert len(t) == 40
    assert not t.image_missing.any() and not t.no_findings.any()
    assert all(ps[0] == "frontal" for ps in t.projections)


def test_table_round_trips_through_parquet(sample_table, tmp_path):
    path = write_studies_table(sample_table, tmp_path / "studies.parquet")
    back = load_studies_table(path)
    assert back.image_ids.tolist() == sample_table.image_ids.tolist()
    assert back.findings.tolist() == sample_table.findings.tolist()


def test_a_studies_table_from_before_projection_source_is_refused_naming_it(sample_table, tmp_path):
    """``--from 02`` on a data folder whose table predates ``projection_source``: one error
    naming the file and the missing column, not a KeyError deep inside the EDA."""
    path = write_studies_table(sample_table.drop(columns=["projection_source"]), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"old\.parquet lacks column\(s\) \['projection_source'\].*notebook 01"):
        load_studies_table(path)


HOSTILE = {
    "bomb.xml": """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">]>
<eCitation><uId id="CXR9001"/><AbstractText Label="FINDINGS">&lol2;</AbstractText></eCitation>""",
    "external.xml": """<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<eCitation><uId id="CXR9002"/><AbstractText Label="FINDINGS">&xxe;</AbstractText></eCitation>""",
    "broken.xml": "<eCitation><uId id='CXR9003'/><AbstractText Label='FINDINGS'>oops</eCitation>",
    "wrongroot.xml": "<html><body/></html>",
}


@pytest.mark.reliability
def test_malformed_and_entity_files_are_named_counted_and_skipped(iuxray_sample, tmp_path, caplog):
    reports = tmp_path / "reports"
    reports.mkdir()
    for name in ("1003.xml", "1013.xml"):
        shutil.copy(iuxray_sample / "reports" / "ecgen-radiology" / name, reports / name)
    for name, text in HOSTILE.items():
        (reports / name).write_text(text)
    t = read_reports(reports)
    assert sorted(t.uid) == ["CXR1003", "CXR1013"]
    malformed = dict(t.attrs["malformed"])
    assert {p.rsplit("/", 1)[-1] for p in malformed} == set(HOSTILE)
    assert "root" not in " ".join(t.findings)  # /etc/passwd never read
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in malformed.items()}
    assert "entities" in reasons["bomb.xml"] and "entities" in reasons["external.xml"]
    assert "not well-formed" in reasons["broken.xml"]
    assert "broken.xml" in caplog.text


@pytest.mark.reliability
def test_missing_or_empty_sections_are_kept_and_flagged(tmp_path):
    (tmp_path / "7.xml").write_text(
        '<eCitation><uId id="CXR7"/><Abstract><AbstractText Label="FINDINGS"/>'
        '<AbstractText Label="IMPRESSION">  No acute\n disease. </AbstractText></Abstract>'
        '<parentImage id="CXR7_IM-1-1001"/></eCitation>')
    (tmp_path / "8.xml").write_text('<eCitation><uId id="CXR8"/><Abstract>'
                                     '<AbstractText Label="FINDINGS">Clear lungs.</AbstractText>'
                                     '</Abstract></eCitation>')  # no IMPRESSION, no image at all
    (tmp_path / "images").mkdir()
    row, without = read_reports(tmp_path, tmp_path / "images").itertuples(index=False)
    assert row.findings == "" and row.no_findings
    assert row.impression == "No acute disease."
    assert row.image_missing and not row.no_image
    assert without.impression == "" and without.no_impression and without.no_image


@pytest.mark.reliability
def test_missing_reports_folder_names_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_acquisition"):
        read_reports(tmp_path / "nope")


REPORT = ('<?xml version="1.0" encoding="{encoding}"?>\n<eCitation><uId id="CXR{n}"/><Abstract>'
          '<AbstractText Label="FINDINGS">{findings}</AbstractText></Abstract></eCitation>')


@pytest.mark.reliability
@pytest.mark.parametrize("encoding, body, reason", [
    ("no-such-codec", "Clear lungs.".encode(), "unknown encoding"),
    ("UTF-16", "Clear lungs.".encode(), "encoding"),
    ("US-ASCII", "Pleural effusion, café-au-lait.".encode("utf-8"), "not well-formed"),
])
def test_a_wrong_encoding_declaration_is_named_and_counted(encoding, body, reason, tmp_path, caplog):
    (tmp_path / "1.xml").write_bytes(REPORT.format(encoding=encoding, n=1, findings="").encode()
                                     .replace(b"></AbstractText>", b">" + body + b"</AbstractText>"))
    (tmp_path / "2.xml").write_text(REPORT.format(encoding="ISO-8859-1", n=2, findings="Normal heart."))
    table = read_reports(tmp_path)
    assert table.uid.tolist() == ["CXR2"] and table.findings.tolist() == ["Normal heart."]
    [(path, why)] = table.attrs["malformed"]
    assert path.endswith("1.xml") and reason in why and "1.xml" in caplog.text


@pytest.mark.reliability
def test_a_latin1_report_declared_as_such_reads_correctly(tmp_path):
    (tmp_path / "3.xml").write_bytes(REPORT.format(encoding="ISO-8859-1", n=3, findings="Opacité.")
                                     .encode("latin-1"))
    assert read_reports(tmp_path).findings.tolist() == ["Opacité."]


@pytest.mark.reliability
def test_an_empty_reports_folder_stops_acquisition_naming_it(tmp_config):
    cfg = tmp_config("full", data__source="folder")
    cfg.paths.make_dirs()
    Image.new("L", (8, 8)).save(cfg.paths.images / "CXR1_IM-0001-1001.png")
    with pytest.raises(AcquisitionError, match=f"{cfg.paths.reports}.*no report files"):
        acquire(cfg)
    (cfg.paths.reports / "1.xml").write_text("<eCitation><oops></eCitation>")
    result = acquire(cfg)
    with pytest.raises(AcquisitionError, match=f"no readable reports under {cfg.paths.reports}"):
        build_studies_table(cfg, result)
    assert not cfg.paths.studies_table.exists()


@pytest.mark.reliability
def test_a_report_whose_image_is_not_on_disk_is_flagged_and_left_out(tmp_config):
    cfg = tmp_config(data__n_phantom_studies=12, data__phantom_image_size=48, images__size=32,
                     tokenizer__vocab_size=300)
    result = acquire(cfg)
    table = read_reports(result.reports_dir, result.images_dir, result.projections_csv)
    lost, half = table.iloc[0], table[table.n_images == 2].iloc[-1]
    for image_id in [*lost.image_ids, half.image_ids[1]]:  # one study loses all, one its lateral
        next(cfg.paths.images.rglob(f"{image_id}.*")).unlink()
    table = build_studies_table(cfg, result).set_index("uid")
    assert table.loc[lost.uid, "image_missing"] and table.loc[half.uid, "image_missing"]
    summary = run_preprocessing(cfg)
    assert summary.dropped["no_image_on_disk"] == 1 and summary.studies == 11
    assert summary.images_skipped == 0


def _report(uid, findings="Clear lungs.", images=()):
    parents = "".join(f'<parentImage id="{i}"/>' for i in images)
    return (f'<eCitation><uId id="{uid}"/><Abstract><AbstractText Label="FINDINGS">{findings}'
            f'</AbstractText></Abstract>{parents}</eCitation>')


@pytest.mark.reliability
def test_a_uid_in_two_report_files_keeps_the_first_and_names_both(tmp_path, caplog):
    (tmp_path / "10.xml").write_text(_report("CXR1", "Second file."))
    (tmp_path / "2.xml").write_text(_report("CXR1", "First file."))
    (tmp_path / "3.xml").write_text(_report("CXR3"))
    t = read_reports(tmp_path)
    assert list(t.uid) == ["CXR1", "CXR3"] and t.findings[0] == "First file."
    assert t.attrs["duplicate_uids"] == [("CXR1", str(tmp_path / "2.xml"), str(tmp_path / "10.xml"))]
    assert "10.xml declares uid CXR1, already read from" in caplog.text and "2.xml" in caplog.text


@pytest.mark.reliability
def test_an_image_name_in_two_folders_and_an_image_listed_twice_are_named(tmp_path, caplog):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "1.xml").write_text(_report("CXR1", images=["CXR1_a", "CXR1_a", "CXR1_b"]))
    for relative in ("images/CXR1_a.png", "images/sub/CXR1_a.png", "images/CXR1_b.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"png")
    t = read_reports(tmp_path / "reports", tmp_path / "images")
    row = t.iloc[0]
    assert list(row.image_ids) == ["CXR1_a", "CXR1_b"] and row.n_images == 2
    assert row.image_paths[0] == str(tmp_path / "images" / "CXR1_a.png")
    assert t.attrs["duplicate_images"] == [("CXR1_a", str(tmp_path / "images" / "CXR1_a.png"),
                                            str(tmp_path / "images" / "sub" / "CXR1_a.png"))]
    assert t.attrs["repeated_image_ids"] == [(str(tmp_path / "reports" / "1.xml"), 1)]
    assert "sub/CXR1_a.png has the same id as" in caplog.text
    assert "lists image(s) more than once" in caplog.text


@pytest.mark.reliability
def test_an_oversized_report_file_is_refused_before_parsing(tmp_path):
    (tmp_path / "1.xml").write_text(_report("CXR1"))
    (tmp_path / "2.xml").write_text(_report("CXR2", "opacity " * 250_000))  # 2 MB of findings
    t = read_reports(tmp_path)
    assert list(t.uid) == ["CXR1"]
    (path, reason), = t.attrs["malformed"]
    assert path.endswith("2.xml") and "over the 1000000-byte limit" in reason


@pytest.mark.reliability
def test_a_uid_repeated_with_other_case_or_whitespace_is_one_study(tmp_path):
    """``" CXR1 "`` and ``"cxr1"`` were kept as studies besides ``CXR1``: one study on three rows."""
    (tmp_path / "1.xml").write_text(_report("CXR1", "First file."))
    (tmp_path / "2.xml").write_text(_report(" CXR1 "))
    (tmp_path / "3.xml").write_text(_report("cxr1"))
    (tmp_path / "4.xml").write_text(_report("  "))  # blank: the file name gives the uid
    t = read_reports(tmp_path)
    assert list(t.uid) == ["CXR1", "CXR4"] and t.findings[0] == "First file."
    assert [(uid, dropped) for uid, _, dropped in t.attrs["duplicate_uids"]] == [
        ("CXR1", str(tmp_path / "2.xml")), ("cxr1", str(tmp_path / "3.xml"))]


@pytest.mark.reliability
def test_report_files_and_uids_with_non_decimal_digits_are_read_and_split(tmp_path):
    """``"²".isdigit()`` is true but ``int("²")`` fails: a file ``².xml`` or a uid ``CXR²``
    crashed read_reports and make_splits with a raw ValueError."""
    from medexgen_lib.splits import make_splits

    (tmp_path / "².xml").write_text(_report("CXR²"))
    (tmp_path / "1.xml").write_text(_report("CXR1"))
    (tmp_path / "٣.xml").write_text(_report("CXR٣"))  # Arabic-Indic 3: decimal, so numbered
    t = read_reports(tmp_path)
    assert list(t.uid) == ["CXR1", "CXR٣", "CXR²"]
    splits = make_splits(t, seed=0, val_fraction=0.0, test_fraction=0.0)
    assert splits["train"] == ["CXR1", "CXR٣", "CXR²"]


@pytest.mark.reliability
def test_a_broken_link_a_link_loop_and_a_folder_named_xml_are_listed_as_malformed(tmp_path, caplog):
    """Each stopped the whole stage (FileNotFoundError, 'Too many levels of symbolic links',
    IsADirectoryError) instead of being listed; the good reports, the one inside the folder
    included, are read."""
    (tmp_path / "1.xml").write_text(_report("CXR1"))
    (tmp_path / "gone.xml").symlink_to(tmp_path / "nowhere.xml")
    (tmp_path / "loop_a.xml").symlink_to(tmp_path / "loop_b.xml")
    (tmp_path / "loop_b.xml").symlink_to(tmp_path / "loop_a.xml")
    (tmp_path / "sub.xml").mkdir()
    (tmp_path / "sub.xml" / "2.xml").write_text(_report("CXR2"))
    t = read_reports(tmp_path)
    assert list(t.uid) == ["CXR1", "CXR2"]
    reasons = {Path(p).name: reason for p, reason in t.attrs["malformed"]}
    assert set(reasons) == {"gone.xml", "loop_a.xml", "loop_b.xml", "sub.xml"}
    assert "No such file or directory" in reasons["gone.xml"]
    assert "symbolic links" in reasons["loop_a.xml"] and "a directory" in reasons["sub.xml"]
    assert "skipping malformed report" in caplog.text and "gone.xml" in caplog.text


@pytest.mark.reliability
def test_a_fifo_named_xml_is_listed_as_malformed_without_being_opened(tmp_path):
    """Opening a FIFO blocks until something writes to it: the stage would hang."""
    import os

    (tmp_path / "1.xml").write_text(_report("CXR1"))
    os.mkfifo(tmp_path / "pipe.xml")
    t = read_reports(tmp_path)
    assert list(t.uid) == ["CXR1"]
    (path, reason), = t.attrs["malformed"]
    assert path.endswith("pipe.xml") and "not a regular file" in reason


@pytest.mark.reliability
def test_uppercase_xml_files_are_read(tmp_path):
    """``*.XML`` reports were ignored (the glob was case-sensitive)."""
    (tmp_path / "1.xml").write_text(_report("CXR1"))
    (tmp_path / "2.XML").write_text(_report("CXR2"))
    (tmp_path / "3.Xml").write_text(_report("CXR3"))
    assert list(read_reports(tmp_path).uid) == ["CXR1", "CXR2", "CXR3"]


@pytest.mark.reliability
def test_a_report_named_dot_xml_is_read(tmp_path):
    """A file named exactly ".xml" has no suffix to pathlib and was skipped silently."""
    (tmp_path / "1.xml").write_text(_report("CXR1"))
    (tmp_path / ".xml").write_text(_report("CXR2"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".XML").write_text("<not xml")
    table = read_reports(tmp_path)
    assert sorted(table.uid) == ["CXR1", "CXR2"]
    assert [path for path, _ in table.attrs["malformed"]] == [str(tmp_path / "sub" / ".XML")]


@pytest.mark.reliability
def test_two_findings_elements_are_both_kept(tmp_path):
    """The second FINDINGS element replaced the first, silently; an empty one after a full one
    emptied the section."""
    (tmp_path / "1.xml").write_text(
        '<eCitation><uId id="CXR1"/><Abstract><AbstractText Label="FINDINGS">Heart size normal.'
        '</AbstractText><AbstractText Label="FINDINGS">Small left  pleural effusion.</AbstractText>'
        '<AbstractText Label="IMPRESSION">Effusion.</AbstractText><AbstractText Label="IMPRESSION"/>'
        '</Abstract></eCitation>')
    row = read_reports(tmp_path).iloc[0]
    assert row.findings == "Heart size normal. Small left pleural effusion."
    assert row.impression == "Effusion." and not row.no_impression
