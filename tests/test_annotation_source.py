"""data.source annotation: an R2Gen-format annotation.json and its images read in place, its split
used by stage 03; bad files refused with one line naming them."""

import json

import numpy as np
import pytest
from PIL import Image

from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.annotation import AnnotationError, read_annotation
from medexgen_lib.files import read_json
from medexgen_lib.phantom import draw_radiograph
from medexgen_lib.preprocess import run_preprocessing
from medexgen_lib.text import target_texts

REPORTS = ["The heart is normal in size. The lungs are clear.",
           "There is a small left pleural effusion. Heart size is normal.",
           "Cardiomegaly is present. No pneumothorax.",
           "Lungs are clear bilaterally. No pleural effusion."]


def write_annotation(root, counts=(6, 2, 3), extra_image=False):
    """An R2Gen-style data set under ``root``: annotation.json and images/<id>/0.png, 1.png."""
    rng = np.random.default_rng(0)
    annotation = {}
    number = 0
    for split, count in zip(("train", "val", "test"), counts):
        annotation[split] = []
        for _ in range(count):
            number += 1
            uid = f"CXR{number}_IM-{number:04d}"
            names = ["0.png", "1.png", "2.png"] if extra_image and number == 1 else ["0.png", "1.png"]
            (root / "images" / uid).mkdir(parents=True)
            for k, name in enumerate(names):
                pixels = draw_radiograph({}, "lateral" if k == 1 else "frontal", 48, rng)
                Image.fromarray(pixels).save(root / "images" / uid / name)
            annotation[split].append({"id": uid, "report": REPORTS[number % len(REPORTS)],
                                      "image_path": [f"{uid}/{name}" for name in names], "split": split})
    (root / "annotation.json").write_text(json.dumps(annotation))
    return annotation


def test_annotation_source_reads_items_views_and_its_split(tmp_config, tmp_path, caplog):
    annotation = write_annotation(tmp_path / "data", extra_image=True)
    cfg = tmp_config(data__source="annotation")
    table = build_studies_table(cfg, acquire(cfg))
    assert list(table.uid) == [item["id"] for split in ("train", "val", "test") for item in annotation[split]]
    first = table.iloc[0]
    # the stated rule: image_path[0] frontal, [1] lateral, a third one ignored with a warning count
    assert list(first.image_ids) == ["CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png"]
    assert list(first.projections) == ["frontal", "lateral"]
    assert first.image_paths[1] == str(tmp_path / "data" / "images" / "CXR1_IM-0001" / "1.png")
    assert "1 image(s) beyond the first two" in caplog.text
    # the report is the target: the findings column, which text.target findings trains on
    assert list(target_texts(table, "findings")) == [item["report"] for split in ("train", "val", "test")
                                                     for item in annotation[split]]
    assert table.no_impression.all() and not table.no_findings.any()
    summary = run_preprocessing(cfg)
    splits = read_json(cfg.paths.processed / "splits.json")
    for split in ("train", "val", "test"):
        assert splits[split] == sorted(item["id"] for item in annotation[split])
    assert summary.split_source == "source:annotation"
    # normal/abnormal comes from MeSH terms, which R2Gen's annotations do not carry: unknown, not "all abnormal"
    assert {c["abnormal"] for c in splits["meta"]["counts"].values()} == {None}


def test_a_projections_table_decides_the_views(tmp_config, tmp_path):
    write_annotation(tmp_path / "data", counts=(2, 1, 1))
    table_csv = tmp_path / "views.csv"
    table_csv.write_text("filename,projection\nCXR1_IM-0001/0.png,Lateral\nCXR1_IM-0001/1.png,Frontal\n")
    table, _ = read_annotation(tmp_path / "data" / "annotation.json", tmp_path / "data" / "images", table_csv)
    assert list(table.projections[0]) == ["lateral", "frontal"]
    assert list(table.projections[1]) == ["unknown", "unknown"]
    assert table.projection_source[0] == str(table_csv)
    assert table.projection_source[1] == "unknown"  # the table named none of its images, as read_reports says


def test_annotation_file_and_image_root_can_live_elsewhere(tmp_config, tmp_path):
    write_annotation(tmp_path / "r2gen", counts=(2, 1, 1))
    cfg = tmp_config(data__source="annotation", data__annotation_file=str(tmp_path / "r2gen" / "annotation.json"),
                     data__image_root=str(tmp_path / "r2gen" / "images"))
    table = build_studies_table(cfg, acquire(cfg))
    assert len(table) == 4 and table.image_paths[0][0].startswith(str(tmp_path / "r2gen" / "images"))
    assert read_json(cfg.paths.processed / "source_split.json")["val"] == [{"id": "CXR3_IM-0003", "split": "val"}]


def test_items_whose_study_id_is_null_are_each_their_own_study(tmp_path):
    # a table exported to JSON writes a missing study_id as null; it is no study shared across splits
    root = tmp_path / "data"
    annotation = write_annotation(root, counts=(2, 1, 1))
    for items in annotation.values():
        for item in items:
            item.update(study_id=None, subject_id=None)
    (root / "annotation.json").write_text(json.dumps(annotation))
    table, splits = read_annotation(root / "annotation.json", root / "images")
    assert {name: len(uids) for name, uids in splits.items()} == {"train": 2, "val": 1, "test": 1}
    assert list(table.uid) == [item["id"] for name in ("train", "val", "test") for item in annotation[name]]


def _rewrite(path, change):
    annotation = json.loads(path.read_text())
    change(annotation)
    path.write_text(json.dumps(annotation))


@pytest.mark.reliability
@pytest.mark.parametrize("case, message", [
    ("not_json", "cannot be read as JSON"),
    ("no_lists", "must hold 'train', 'val' and 'test' lists"),
    ("missing_image", "CXR2_IM-0002/1.png .*does not exist"),
    ("escaping_path", "leaves the image root"),
    ("empty_path", "has image path '', which names no file"),
    ("absolute_path", r"CXR1_IM-0001/0.png', which is absolute; image_path entries are relative to the image root"),
    ("two_splits", "study CXR1_IM-0001 is in both train and test"),
    ("mimic_study_two_splits", "study 5001 is in both train and val"),
    ("twice", "study CXR1_IM-0001 is twice in train"),
    ("no_report", r"train\[1\] lacks report"),
    ("split_field", "says split 'val' but is in the train list"),
])
def test_bad_annotation_gets_one_line_naming_the_file_and_nothing_is_written(case, message, tmp_config, tmp_path):
    path = tmp_path / "data" / "annotation.json"
    write_annotation(tmp_path / "data", counts=(3, 1, 1))
    changes = {
        "no_lists": lambda a: a.pop("val"),
        "missing_image": lambda a: (tmp_path / "data" / "images" / "CXR2_IM-0002" / "1.png").unlink(),
        "escaping_path": lambda a: a["train"][0]["image_path"].insert(0, "../../etc/passwd"),
        "empty_path": lambda a: a["train"][0]["image_path"].insert(0, ""),
        # an absolute path, even one inside the image root, is refused for what it is
        "absolute_path": lambda a: a["train"][0]["image_path"].__setitem__(
            0, str(tmp_path / "data" / "images" / "CXR1_IM-0001" / "0.png")),
        "two_splits": lambda a: a["test"].append({**a["train"][0], "split": "test"}),
        "mimic_study_two_splits": lambda a: (a["train"][0].update(study_id=5001),
                                             a["val"][0].update(study_id=5001)),
        "twice": lambda a: a["train"].append(a["train"][0]),
        "no_report": lambda a: a["train"][1].pop("report"),
        "split_field": lambda a: a["train"][0].update(split="val"),
    }
    if case == "not_json":
        path.write_text('{"train": [')
    else:
        _rewrite(path, changes[case])
    cfg = tmp_config(data__source="annotation")
    with pytest.raises(AnnotationError, match=message) as info:
        build_studies_table(cfg, acquire(cfg))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not cfg.paths.studies_table.exists()
    assert not (cfg.paths.processed / "source_split.json").exists()


@pytest.mark.reliability
def test_a_missing_annotation_file_is_named(tmp_config):
    from medexgen_lib.acquisition import AcquisitionError

    cfg = tmp_config(data__source="annotation")
    with pytest.raises(AcquisitionError, match=r"annotation.json does not exist; set data.annotation_file"):
        acquire(cfg)
