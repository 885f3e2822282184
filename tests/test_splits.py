import pandas as pd
import pytest

from medexgen_lib.reports import read_reports
from medexgen_lib.splits import (is_abnormal, load_splits, make_splits, splits_from_annotation,
                                 usable_studies, write_splits)
from medexgen_lib.text import target_texts


@pytest.fixture(scope="module")
def sample(iuxray_sample):
    return read_reports(iuxray_sample / "reports")


def test_splits_are_deterministic_disjoint_complete_and_stratified(sample):
    a = make_splits(sample, seed=1)
    assert a == make_splits(sample, seed=1)
    assert a != make_splits(sample, seed=2)
    sets = [set(a[name]) for name in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(sample.uid)
    abnormal = dict(zip(sample.uid, sample.mesh_major.map(is_abnormal)))
    overall = sum(abnormal.values()) / len(abnormal)
    for name in ("train", "test"):
        share = sum(abnormal[u] for u in a[name]) / len(a[name])
        assert abs(share - overall) < 0.03
    assert abs(len(a["test"]) - 0.2 * len(sample)) <= 2


@pytest.mark.reliability
def test_bad_fractions_are_refused(sample):
    with pytest.raises(ValueError, match="test_fraction"):
        make_splits(sample, 0, val_fraction=0.5, test_fraction=0.5)


def test_r2gen_annotation_file_is_honoured(sample, iuxray_sample):
    splits, missing = splits_from_annotation(iuxray_sample / "annotation.json", sample)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [201, 24, 65]
    assert sum(missing.values()) == 0
    assert "CXR1573" in splits["train"]


def test_annotation_ids_absent_from_the_table_are_counted(sample, iuxray_sample):
    small = sample[sample.uid != "CXR1573"]
    splits, missing = splits_from_annotation(iuxray_sample / "annotation.json", small)
    assert missing["train"] == 1 and "CXR1573" not in splits["train"]


@pytest.mark.reliability
def test_bad_annotation_file(tmp_path, sample):
    (tmp_path / "a.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="a.json"):
        splits_from_annotation(tmp_path / "a.json", sample)


def test_usable_studies_counts_what_it_leaves_out(iuxray_sample):
    table = read_reports(iuxray_sample / "reports", iuxray_sample / "images")
    usable, dropped = usable_studies(table, target_texts(table))
    assert list(usable.uid) == ["CXR3"]  # the only sample report whose images are on disk
    assert dropped["no_target_text"] == 3
    assert dropped["no_image_on_disk"] == 397 - 3 - 1


@pytest.mark.reliability
def test_a_study_is_in_exactly_one_split(sample, tmp_path):
    doubled = pd.concat([sample, sample.iloc[:5]], ignore_index=True)
    with pytest.raises(ValueError, match="5 uid\\(s\\) on more than one row"):
        make_splits(doubled, seed=0)
    splits = make_splits(sample, seed=0)
    leaked = {**splits, "test": splits["test"] + splits["train"][:1]}
    write_splits(leaked, tmp_path / "splits.json", {})
    with pytest.raises(ValueError, match=f"study {splits['train'][0]} is in both train and test"):
        load_splits(tmp_path / "splits.json")
