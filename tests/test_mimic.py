"""data.source mimic: MIMIC-CXR-JPG 2.0.0's layout read in place, reports sectioned in MIMIC's
shapes, its split used; bad files refused with one line naming them."""

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medexgen_lib.acquisition import AcquisitionError, acquire, build_studies_table
from medexgen_lib.files import read_json
from medexgen_lib.mimic import METADATA_CSV, SPLIT_CSV, MimicError, read_mimic
from medexgen_lib.mimic_sections import normalise_name, section_report

STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""

WET_READ = """ WET READ: ___ ___ ___ 10:46 PM
  Mild pulmonary vascular congestion.
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  Dyspnea.
 
 FINDINGS:  Moderate cardiomegaly.  Small right pleural effusion.
 
 IMPRESSION:  Cardiomegaly and right effusion.
"""

ADDENDUM = """                                 FINAL ADDENDUM
 ADDENDUM:  The findings were discussed with Dr. ___ by Dr. ___ on the telephone on ___ at
 4:15 PM.
 IMPRESSION:  Findings communicated.
 
                                 FINAL REPORT
 FINDINGS:  Left lower lobe consolidation.
 
 IMPRESSION:  Pneumonia in the left lower lobe.
"""


@pytest.mark.parametrize("text, expected", [
    (STANDARD, {"findings": "There is no focal consolidation, pleural effusion or pneumothorax. The "
                            "cardiomediastinal silhouette is normal.",
                "impression": "No acute cardiopulmonary process.",
                "indication": "XXXX F with new onset ascites // eval for infection",
                "comparison": "None.", "examination": "CHEST (PA AND LAT)"}),
    # impression only: no findings section at all
    (" FINAL REPORT\n INDICATION:  Cough.\n \n IMPRESSION:  No acute process.\n",
     {"findings": None, "impression": "No acute process.", "indication": "Cough."}),
    # another order, and the impression's own line wrapping
    (" IMPRESSION:  Small left effusion.\n \n FINDINGS:\n Small left pleural effusion.\n The heart\n is normal.\n",
     {"impression": "Small left effusion.", "findings": "Small left pleural effusion. The heart is normal."}),
    # the wet read is its own section, ended by MIMIC's line of underscores; never findings
    (WET_READ, {"wet read": "XXXX XXXX XXXX 10:46 PM Mild pulmonary vascular congestion.",
                "findings": "Moderate cardiomegaly. Small right pleural effusion.",
                "impression": "Cardiomegaly and right effusion."}),
    # an addendum (and an IMPRESSION written inside it) never replaces the report's own sections
    (ADDENDUM, {"findings": "Left lower lobe consolidation.",
                "impression": "Pneumonia in the left lower lobe.",
                "addendum": "The findings were discussed with Dr. XXXX by Dr. XXXX on the telephone on "
                            "XXXX at 4:15 PM. Findings communicated."}),
    # an ADDENDUM: section at the end of a report
    (" FINDINGS:  Clear lungs.\n IMPRESSION:  Normal.\n ADDENDUM:  Compared with ___, unchanged.\n",
     {"findings": "Clear lungs.", "impression": "Normal.", "addendum": "Compared with XXXX, unchanged."}),
    # de-identified words inside the target become the anonymisation token
    (" FINDINGS:  Since ___, the ___ tube was removed.\n IMPRESSION:  ___\n",
     {"findings": "Since XXXX, the XXXX tube was removed.", "impression": "XXXX"}),
    # an empty FINDINGS is dropped; two FINDINGS sections are joined
    (" FINDINGS:\n \n CHEST, PA AND LATERAL:  Heart normal.\n FINDINGS:  No effusion.\n CONCLUSION:  Normal.\n",
     {"findings": "Heart normal. No effusion.", "impression": "Normal."}),
])
def test_sections_of_reports_in_mimics_shapes(text, expected):
    sections = section_report(text)
    for name, value in expected.items():
        assert sections.get(name) == value, name


def test_a_report_without_any_header_has_no_sections():
    # the reader flags such a study and names its file
    assert section_report("                FINAL REPORT\n Heart size normal.  Lungs clear.\n") == {}


@pytest.mark.parametrize("header, name", [("REASON FOR EXAM", "indication"), ("FINDINGS AND IMPRESSION", "impression"),
                                          ("CLINICAL HISTORY", "history"), ("IMPRESSON", "impression"),
                                          ("PORTABLE UPRIGHT CHEST", "findings"), ("WET READ", "wet read"),
                                          ("NOTIFICATION", "notification")])
def test_section_names_are_normalised(header, name):
    assert normalise_name(header) == name


def _jpeg(path, view):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((40, 40), 200 if view in ("PA", "AP") else 90, dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def write_mimic(root, studies):
    """A small MIMIC-CXR-JPG layout: ``studies`` is a list of (subject, study, split, [(dicom, view)], text)."""
    split_rows, meta_rows = ["dicom_id,study_id,subject_id,split"], ["dicom_id,subject_id,study_id,ViewPosition"]
    for subject, study, split, images, text in studies:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        for dicom, view in images:
            split_rows.append(f"{dicom},{study},{subject},{split}")
            meta_rows.append(f"{dicom},{subject},{study},{view}")
            _jpeg(folder / f"s{study}" / f"{dicom}.jpg", view)
        if text is not None:
            (folder / f"s{study}.txt").write_text(text)
    for name, rows in ((SPLIT_CSV, split_rows), (METADATA_CSV, meta_rows)):
        with gzip.open(root / name, "wt") as handle:
            handle.write("\n".join(rows) + "\n")


STUDIES = [
    ("10000032", "50414267", "train", [("d-lat", "LATERAL"), ("d-ap", "AP"), ("d-pa", "PA"), ("d-lao", "LAO")], STANDARD),
    ("10000032", "53189527", "train", [("e-ap", "AP")], WET_READ),
    ("10000764", "57375967", "validate", [("f-pa", "PA"), ("f-ll", "LL")], ADDENDUM),
    ("10000898", "50771383", "test", [("g-pa", "PA"), ("g-lat", "")], " IMPRESSION:  No acute process.\n"),
    ("10000935", "51178377", "test", [("h-pa", "PA")], "Heart size normal. Lungs clear.\n"),
]


def test_mimic_layout_becomes_studies_views_and_the_official_split(tmp_path, caplog):
    write_mimic(tmp_path, STUDIES)
    table, splits = read_mimic(tmp_path)
    assert splits == {"train": ["s50414267", "s53189527"], "val": ["s57375967"], "test": ["s50771383", "s51178377"]}
    first = table.set_index("uid").loc["s50414267"]
    # PA before AP before LATERAL; the oblique (LAO) left out and counted
    assert list(first.image_ids) == ["d-pa", "d-ap", "d-lat"]
    assert list(first.projections) == ["frontal", "frontal", "lateral"]
    assert first.image_paths[0] == str(tmp_path / "files/p10/p10000032/s50414267/d-pa.jpg")
    assert first.findings.startswith("There is no focal consolidation") and first.impression
    assert first.report_file == "files/p10/p10000032/s50414267.txt"
    assert table.attrs["ignored_images"] == 2  # LAO and an image without a ViewPosition
    flagged = table.set_index("uid")
    assert flagged.loc["s50771383", "no_findings"] and not flagged.loc["s50771383", "no_impression"]
    assert flagged.loc["s51178377", "no_findings"] and flagged.loc["s51178377", "no_impression"]
    assert [m[0] for m in table.attrs["malformed"]] == [str(tmp_path / "files/p10/p10000935/s51178377.txt")]
    assert "s51178377.txt: no sections" in caplog.text
    assert flagged.loc["s57375967", "impression"] == "Pneumonia in the left lower lobe."


def test_stage_01_reads_mimic_in_place_and_stage_03_uses_its_split(tmp_config, tmp_path):
    from medexgen_lib.preprocess import run_preprocessing

    write_mimic(tmp_path / "data", STUDIES)
    cfg = tmp_config(data__source="mimic", split__require_findings=True, text__target="findings")
    table = build_studies_table(cfg, acquire(cfg))
    assert len(table) == 5
    malformed = read_json(cfg.paths.logs / "acquisition_malformed.json")
    assert malformed["count"] == 1
    assert read_json(cfg.paths.processed / "source_split.json")["val"] == [{"id": "s57375967", "split": "val"}]
    summary = run_preprocessing(cfg)
    splits = read_json(cfg.paths.processed / "splits.json")
    assert (splits["train"], splits["val"], splits["test"]) == (["s50414267", "s53189527"], ["s57375967"], [])
    assert summary.split_source == "source:mimic"


@pytest.mark.reliability
@pytest.mark.parametrize("case, message", [
    ("no_split_csv", f"{SPLIT_CSV} does not exist"),
    ("no_metadata_csv", f"{METADATA_CSV} does not exist"),
    ("split_not_gzip", f"{SPLIT_CSV} cannot be read as a gzipped CSV"),
    ("metadata_truncated", f"{METADATA_CSV} cannot be read as a gzipped CSV"),
    ("split_columns", rf"{SPLIT_CSV} lacks column\(s\) \['split'\]"),
    ("two_splits", "study 50414267 is in both test and train"),
    ("bad_split_name", "has split 'holdout'"),
    ("no_reports", "no free-text report"),
])
def test_bad_mimic_files_get_one_line_naming_the_file(case, message, tmp_config, tmp_path):
    data = tmp_path / "data"
    studies = list(STUDIES)
    if case == "two_splits":
        studies.append(("10000032", "50414267", "test", [("d-extra", "PA")], STANDARD))
    if case == "bad_split_name":
        studies[0] = studies[0][:2] + ("holdout",) + studies[0][3:]
    if case == "no_reports":
        studies = [s[:4] + (None,) for s in studies]
    write_mimic(data, studies)
    if case == "no_split_csv":
        (data / SPLIT_CSV).unlink()
    if case == "no_metadata_csv":
        (data / METADATA_CSV).unlink()
    if case == "split_not_gzip":
        (data / SPLIT_CSV).write_text("dicom_id,study_id,subject_id,split\n")
    if case == "metadata_truncated":
        (data / METADATA_CSV).write_bytes((data / METADATA_CSV).read_bytes()[:40])
    if case == "split_columns":
        with gzip.open(data / SPLIT_CSV, "wt") as handle:
            handle.write("dicom_id,study_id,subject_id\nd-pa,50414267,10000032\n")
    cfg = tmp_config(data__source="mimic")
    with pytest.raises((MimicError, AcquisitionError), match=message) as info:
        build_studies_table(cfg, acquire(cfg))
    assert "\n" not in str(info.value)
    assert not cfg.paths.studies_table.exists() and not (cfg.paths.processed / "source_split.json").exists()


@pytest.mark.reliability
def test_reports_without_sections_or_unreadable_are_flagged_named_and_left_out_of_training(tmp_config, tmp_path, caplog):
    from medexgen_lib.preprocess import run_preprocessing

    data = tmp_path / "data"
    write_mimic(data, STUDIES[:3] + [("10000898", "50771383", "train", [("g-pa", "PA")], "No headers here.\n"),
                                     ("10000935", "51178377", "train", [("h-pa", "PA")], None)])
    (data / "files/p10/p10000935/s51178377.txt").mkdir()  # a folder where the report should be
    cfg = tmp_config(data__source="mimic")
    table = build_studies_table(cfg, acquire(cfg)).set_index("uid")
    for uid, reason in (("s50771383", "no sections"), ("s51178377", "not a regular file")):
        assert table.loc[uid, "no_findings"] and table.loc[uid, "no_impression"]
        name = table.loc[uid, "report_file"]
        assert f"{name}: {reason}" in caplog.text
    listed = read_json(cfg.paths.logs / "acquisition_malformed.json")
    assert listed["count"] == 2 and {Path(f).name for f, _ in listed["files"]} == {"s50771383.txt", "s51178377.txt"}
    summary = run_preprocessing(cfg)
    assert summary.dropped["no_target_text"] == 2
    assert "s50771383" not in read_json(cfg.paths.processed / "splits.json")["train"]
