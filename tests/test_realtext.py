"""The real-text phantom: real report XMLs, images drawn from their MeSH terms, a dev split."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medexgen_lib.realtext import (MAPPING_VERSION, TRUTH_FILE, draw_images_for_reports,
                                   findings_from_mesh, load_truth, main, stated_findings,
                                   write_dev_split)
from medexgen_lib.reports import BUNDLED_PROJECTIONS, read_reports

# Sample reports: effusion right (153), pneumothorax left (253), left upper consolidation (1203),
# cardiomegaly + bilateral effusion + bilateral consolidation, one frontal image (313),
# borderline heart (13), three images (113), retrocardiac opacity but no image (1613),
# normal (3 and 23).
SUBSET = ["153", "253", "1203", "313", "13", "113", "1613", "3", "23"]


def _subset(iuxray_sample, folder, names=SUBSET):
    target = folder / "ecgen-radiology"
    target.mkdir(parents=True)
    for name in names:
        shutil.copyfile(iuxray_sample / "reports" / "ecgen-radiology" / f"{name}.xml",
                        target / f"{name}.xml")
    return folder


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("terms, expected", [
    (["Pleural Effusion/right/small"], {"effusion": "right"}),
    (["Pleural Effusion/bilateral"], {"effusion": "bilateral"}),
    (["Nodule/lung/upper lobe/left"], {"nodule": "left-upper-nodule"}),
    (["Mass/lung/apex/right"], {"nodule": "right-upper-mass"}),
    (["Nodule/lung/middle lobe/right"], {"nodule": "right-lower-nodule"}),
    (["Opacity/lung/base/left"], {"consolidation": "left-lower"}),
    (["Opacity/lung/lingula"], {"consolidation": "left-lower"}),
    (["Pneumonia/upper lobe/right"], {"consolidation": "right-upper"}),
    (["Infiltrate/lung/upper lobe/left"], {"consolidation": "left-upper"}),
    (["Opacity/lung/base/left", "Airspace Disease/lung/base/right"], {"consolidation": "bilateral-lower"}),
    (["Opacity/lung/bilateral/interstitial/diffuse"], {"consolidation": "bilateral-lower"}),
    (["Pulmonary Congestion"], {"edema": ""}),
    (["Pulmonary Edema/interstitial/mild"], {"edema": ""}),
    (["normal"], {}),
    (["Cardiomegaly/mild"], {"cardiomegaly": ""}),
    (["Cardiac Shadow/enlarged/moderate"], {"cardiomegaly": ""}),
    (["Cardiomegaly/borderline"], {}),
    (["Cardiac Shadow/borderline"], {}),
    (["Mass/breast/large", "Opacity/ribs/anterior", "Nodule/pleura/left"], {}),
    (["Hydropneumothorax/right"], {"effusion": "right", "pneumothorax": "right"}),
    (["Pneumothorax/apex/left/small"], {"pneumothorax": "left"}),
    (["Calcified Granuloma/lung/upper lobe/right", "Lung/hypoinflation", "No Indexing"],
     {"granuloma": "right-upper"}),
    (["Granulomatous Disease/lung/lingula"], {"granuloma": "left-lower"}),
    (["Calcified Granuloma/scattered/multiple", "Granuloma/lung/apex/left"], {"granuloma": "bilateral-upper"}),
    (["Calcified Granuloma/mediastinum/multiple", "Calcinosis/aorta"], {}),
    (["Pulmonary Atelectasis/base/left/mild"], {"atelectasis": "left"}),
    (["Pulmonary Atelectasis/base/bilateral", "Opacity/lung/base/right"],
     {"atelectasis": "bilateral", "consolidation": "right-lower"}),
    (["Pulmonary Atelectasis/lingula"], {"atelectasis": "left"}),
    (["Pulmonary Atelectasis/borderline"], {}),
    (["Lung/hypoinflation", "No Indexing"], {}),
    (["cardiomegaly", "PLEURAL EFFUSION/LEFT"], {"cardiomegaly": "", "effusion": "left"}),
])
def test_mesh_terms_map_to_the_documented_drawings(terms, expected):
    findings, guessed = findings_from_mesh(terms, np.random.default_rng(0))
    assert findings == expected
    assert guessed == []


def test_a_finding_without_side_or_zone_gets_a_seeded_random_one():
    terms = ["Pleural Effusion/small", "Nodule/lung", "Opacity/lung/hilum"]
    draws = [findings_from_mesh(terms, np.random.default_rng(seed)) for seed in range(12)]
    assert draws[3] == findings_from_mesh(terms, np.random.default_rng(3))
    for findings, guessed in draws:
        assert findings["effusion"] in ("left", "right")
        side, zone, kind = findings["nodule"].split("-")
        assert side in ("left", "right") and zone in ("upper", "lower") and kind == "nodule"
        assert findings["consolidation"].endswith("-lower")  # no zone named: drawn lower
        assert guessed == ["effusion", "nodule", "consolidation"]
    for seed in range(12):  # a granuloma, like a nodule, gets a random zone as well as a side
        findings, guessed = findings_from_mesh(["Granulomatous Disease", "Pulmonary Atelectasis"],
                                               np.random.default_rng(seed))
        side, zone = findings["granuloma"].split("-")
        assert side in ("left", "right") and zone in ("upper", "lower")
        assert findings["atelectasis"] in ("left", "right")
        assert guessed == ["atelectasis", "granuloma"]
    assert {f["effusion"] for f, _ in draws} == {"left", "right"}
    # A side named by one term is not guessed for the finding.
    assert findings_from_mesh(["Opacity/lung", "Pneumonia/lower lobe/left"],
                              np.random.default_rng(0)) == ({"consolidation": "left-lower"}, [])


def test_sample_reports_drawn_and_read_by_the_folder_path(iuxray_sample, tmp_path, tmp_config):
    from medexgen_lib.acquisition import acquire, build_studies_table

    source = _subset(iuxray_sample, tmp_path / "in")
    summary = draw_images_for_reports(source, tmp_path / "data", image_size=64, seed=0)
    original = read_reports(source, projections=BUNDLED_PROJECTIONS).set_index("uid")
    assert summary["studies"] == len(SUBSET) and summary["no_images"] == 1
    assert summary["images"] == sum(original["n_images"]) == len(list((tmp_path / "data" / "images").iterdir()))
    # The XMLs are copied unmodified, where data.source=folder reads them.
    for name in SUBSET:
        copied = tmp_path / "data" / "reports" / "ecgen-radiology" / f"{name}.xml"
        assert copied.read_bytes() == (source / "ecgen-radiology" / f"{name}.xml").read_bytes()
    cfg = tmp_config("full", data__source="folder")
    table = build_studies_table(cfg, acquire(cfg)).set_index("uid")
    assert not table["image_missing"].any()
    truth = load_truth(tmp_path / "data" / "reports")
    assert truth["CXR153"] == {"effusion": "right"}
    assert truth["CXR253"] == {"pneumothorax": "left"}
    assert truth["CXR1203"] == {"consolidation": "left-upper"}
    assert truth["CXR313"] == {"cardiomegaly": "", "effusion": "bilateral",
                               "consolidation": "bilateral-lower"}
    assert truth["CXR13"] == truth["CXR3"] == truth["CXR23"] == {}
    # Retrocardiac opacity, atelectasis with no side (a seeded guess); kept, no image.
    assert truth["CXR1613"]["consolidation"] == "left-lower"
    assert truth["CXR1613"]["atelectasis"] in ("left", "right") and len(truth["CXR1613"]) == 2
    for uid, row in table.iterrows():
        assert row["projections"] == original.loc[uid, "projections"]
        for path, view in zip(row["image_paths"], row["projections"]):
            pixels = np.asarray(Image.open(path), dtype=float)
            assert pixels.shape == (64, 64)
            # The spine: a bright column at the middle (frontal) or at the back (lateral).
            middle, back = pixels[20:45, 30:34].mean(), pixels[20:45, 49:54].mean()
            assert (middle > back + 20) if view == "frontal" else (back > middle + 20)


def test_same_seed_same_files_a_subset_draws_the_same_pixels(iuxray_sample, tmp_path):
    source = _subset(iuxray_sample, tmp_path / "in")
    small = _subset(iuxray_sample, tmp_path / "in_small", SUBSET[:3])
    for name, folder, seed in (("a", source, 1), ("b", source, 1), ("c", source, 2), ("d", small, 1)):
        draw_images_for_reports(folder, tmp_path / name, image_size=32, seed=seed)
    a, b, c, d = (_files(tmp_path / name / "images") for name in "abcd")
    assert a == b and a != c
    assert d and all(a[name] == pixels for name, pixels in d.items())
    truth = json.loads((tmp_path / "a" / "reports" / TRUTH_FILE).read_text())
    assert truth["seed"] == 1 and len(truth["studies"]) == len(SUBSET)


def test_a_truth_file_of_another_mapping_version_is_read_with_a_warning(iuxray_sample, tmp_path, caplog):
    """Images drawn by an older mapping score the same findings but are not the images the
    results were measured on: reading their truth file says so."""
    draw_images_for_reports(_subset(iuxray_sample, tmp_path / "in", SUBSET[:3]), tmp_path / "data",
                            image_size=32, seed=0)
    truth_file = tmp_path / "data" / "reports" / TRUTH_FILE
    with caplog.at_level("WARNING", logger="medexgen_lib.realtext"):
        current = load_truth(truth_file)
    assert not caplog.records
    data = json.loads(truth_file.read_text())
    truth_file.write_text(json.dumps({**data, "mapping_version": "2"}))
    with caplog.at_level("WARNING", logger="medexgen_lib.realtext"):
        assert load_truth(truth_file) == current
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "mapping version 2" in caplog.text and f"version {MAPPING_VERSION}" in caplog.text


@pytest.mark.reliability
def test_a_hand_made_truth_file_with_the_version_as_a_number_or_none_warns_only_where_it_differs(
        tmp_path, caplog):
    """A number 3 is version "3" (no warning saying "version 3 ... version 3"); a file without
    the key says it has none."""
    studies = [{"uid": "1", "findings": {"effusion": "left"}}]
    for version, warns in ((int(MAPPING_VERSION), None), (int(MAPPING_VERSION) - 1, "mapping version"),
                           (None, "no mapping version")):
        path = tmp_path / f"truth_{warns is None}_{version is None}.json"
        path.write_text(json.dumps({"studies": studies} if version is None
                                   else {"mapping_version": version, "studies": studies}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="medexgen_lib.realtext"):
            assert load_truth(path) == {"1": {"effusion": "left"}}
        if warns is None:
            assert not caplog.records, version
        else:
            assert len(caplog.records) == 1 and warns in caplog.text and "None" not in caplog.text, version


@pytest.mark.reliability
def test_non_empty_output_refused_and_kept_odd_image_ids_not_written(iuxray_sample, tmp_path):
    source = _subset(iuxray_sample, tmp_path / "in", ["153"])
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / "mine.png").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="images is not empty"):
        draw_images_for_reports(source, tmp_path / "out", image_size=32)
    assert (tmp_path / "out" / "images" / "mine.png").read_bytes() == b"keep"
    assert not (tmp_path / "out" / "reports").exists()
    xml = source / "ecgen-radiology" / "153.xml"
    text = xml.read_text(encoding="utf-8")
    first_id = text.split('parentImage id="')[1].split('"')[0]
    xml.write_text(text.replace(f'"{first_id}"', '"../../escaped"'), encoding="utf-8")
    summary = draw_images_for_reports(source, tmp_path / "fresh", image_size=32)
    assert summary["refused_image_ids"] == 1 and summary["images"] == 1
    assert not list(tmp_path.rglob("escaped*"))
    assert main(["--reports", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1


def test_dev_split_is_accepted_by_the_split_code(iuxray_sample, tmp_path, tmp_config, capsys):
    from medexgen_lib.acquisition import acquire, build_studies_table
    from medexgen_lib.splits import splits_from_annotation

    r2gen = json.loads((iuxray_sample / "annotation.json").read_text())
    trainval = tmp_path / "trainval.json"
    trainval.write_text(json.dumps({"train": r2gen["train"], "val": r2gen["val"]}))
    val_uids = {entry["id"].split("_")[0] for entry in r2gen["val"]}
    train_uids = {entry["id"].split("_")[0] for entry in r2gen["train"]}
    chosen = write_dev_split(trainval, tmp_path / "dev.json", seed=0, val_studies=10)
    assert set(chosen["test"]) == val_uids
    assert set(chosen["train"]) | set(chosen["val"]) == train_uids
    assert not set(chosen["train"]) & set(chosen["val"]) and len(chosen["val"]) == 10
    assert write_dev_split(trainval, tmp_path / "again.json", seed=0, val_studies=10) == chosen
    assert write_dev_split(trainval, tmp_path / "other.json", seed=1, val_studies=10)["val"] != chosen["val"]
    with pytest.raises(ValueError, match=f"{len(train_uids)} training studies cannot give"):
        write_dev_split(trainval, tmp_path / "all.json", val_studies=len(train_uids))
    written = json.loads((tmp_path / "dev.json").read_text())
    assert all(entry["split"] == name for name in written for entry in written[name])

    # The CLI draws the split's studies and writes the split; the split code reads it.
    chosen = write_dev_split(trainval, tmp_path / "dev.json", seed=0, val_studies=10)
    names = sorted(u.removeprefix("CXR") for u in chosen["train"][:12] + chosen["val"] + chosen["test"])
    source = _subset(iuxray_sample, tmp_path / "in", names)
    cfg = tmp_config("demo", data__source="folder", split__annotation_file=str(tmp_path / "cli.json"))
    assert main(["--reports", str(source), "--out", cfg.paths.data_dir, "--size", "32",
                 "--annotation", str(trainval), "--dev-split", str(tmp_path / "cli.json"),
                 "--val-studies", "10"]) == 0
    assert f"test: {len(chosen['test'])} studies in the split file" in capsys.readouterr().out
    table = build_studies_table(cfg, acquire(cfg))
    splits, missing = splits_from_annotation(cfg.split.annotation_file, table)
    assert splits == {"train": chosen["train"][:12], "val": chosen["val"], "test": chosen["test"]}
    assert missing == {"train": len(chosen["train"]) - 12, "val": 0, "test": 0}


@pytest.mark.reliability
def test_dev_split_refuses_a_file_without_train_and_val(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="bad.json must hold 'train' and 'val'"):
        write_dev_split(bad, tmp_path / "out.json")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read annotation file .*bad.json"):
        write_dev_split(bad, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_stated_findings_on_hand_made_reports():
    truth = {"CXR1": {"cardiomegaly": "", "effusion": "left"}, "CXR2": {"nodule": "right-upper-nodule"},
             "CXR3": {}, "CXR4": {"consolidation": "left-lower"}, "CXR5": {"edema": ""},
             "CXR6": {"atelectasis": "left", "granuloma": "right-upper"}}
    predictions = {
        "CXR1": "The heart is enlarged. No pleural effusion.",   # cardiomegaly stated, effusion missed
        "CXR2": "No acute cardiopulmonary abnormality.",         # nodule missed: a finding-free report
        "CXR3": "There is a left lower lobe nodule.",            # a nodule where none was drawn
        "CXR4": "Patchy left basilar airspace opacity.",         # Lung Opacity states consolidation
        "CXR5": "Hyperexpanded lungs consistent with emphysema.",  # a finding, but not the drawn one
        "CXR6": "Mild left basilar atelectasis.",                # atelectasis stated, granuloma missed
    }
    scores = stated_findings(predictions, truth)
    assert (scores["drawn_cardiomegaly_recall"], scores["drawn_effusion_recall"]) == (1.0, 0.0)
    assert scores["drawn_nodule"] == 1 and scores["drawn_nodule_hits"] == 0
    assert scores["drawn_nodule_stated"] == 1 and scores["drawn_nodule_precision"] == 0.0
    assert scores["drawn_consolidation_recall"] == scores["drawn_consolidation_precision"] == 1.0
    assert scores["drawn_edema_recall"] == 0.0 and scores["drawn_edema_precision"] is None
    assert scores["drawn_pneumothorax_recall"] is None
    assert scores["drawn_atelectasis_recall"] == 1.0 and scores["drawn_granuloma_recall"] == 0.0
    # Pooled over cardiomegaly, effusion, nodule, consolidation: 2 of 4 drawn, 2 of 3 stated.
    assert scores["drawn_recall"] == 0.5 and scores["drawn_precision"] == pytest.approx(2 / 3)
    assert scores["drawn_studies"] == 5
    assert scores["drawn_missed_studies"] == 2  # CXR2 and CXR5 state none of the drawn kinds
    assert scores["drawn_finding_free_studies"] == 1  # CXR2 only
    with pytest.raises(ValueError, match="CXR9"):
        stated_findings({"CXR9": "Normal chest."}, truth)


@pytest.mark.reliability
@pytest.mark.parametrize("spelling", ["same path", "other spelling"])
def test_the_dev_split_never_overwrites_the_annotation_file(spelling, iuxray_sample, tmp_path, capsys):
    annotation = tmp_path / "annotation.json"
    shutil.copy(iuxray_sample / "annotation.json", annotation)
    before = annotation.read_bytes()
    dev_split = annotation if spelling == "same path" else tmp_path / "sub" / ".." / "annotation.json"
    (tmp_path / "sub").mkdir()
    source = _subset(iuxray_sample, tmp_path / "in", ["153"])
    assert main(["--reports", str(source), "--out", str(tmp_path / "out"), "--size", "32",
                 "--annotation", str(annotation), "--dev-split", str(dev_split)]) == 1
    assert "annotation.json" in capsys.readouterr().err
    assert annotation.read_bytes() == before and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is the annotation file"):
        write_dev_split(annotation, dev_split)
    assert annotation.read_bytes() == before
