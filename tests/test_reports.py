"""The XML reader on the real IU X-Ray sample, on phantom data and on hostile files."""

import shutil
from collections import Counter

import pytest

from medexgen_lib.reports import load_studies_table, read_reports, write_studies_table


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
    assert (t.projection_source == "table").all()
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


def test_empty_sections_are_kept_and_flagged(tmp_path):
    (tmp_path / "7.xml").write_text(
        '<eCitation><uId id="CXR7"/><Abstract><AbstractText Label="FINDINGS"/>'
        '<AbstractText Label="IMPRESSION">  No acute\n disease. </AbstractText></Abstract>'
        '<parentImage id="CXR7_IM-1-1001"/></eCitation>')
    (tmp_path / "images").mkdir()
    row = read_reports(tmp_path, tmp_path / "images").iloc[0]
    assert row.findings == "" and row.no_findings
    assert row.impression == "No acute disease."
    assert row.image_missing and not row.no_image


def test_missing_reports_folder_names_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_acquisition"):
        read_reports(tmp_path / "nope")
