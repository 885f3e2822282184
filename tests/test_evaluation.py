"""Stage 05 end to end with a tiny model on phantom data; baselines; scoring files."""

import copy
import dataclasses
import json
from collections import Counter

import pytest

from medexgen_lib.__main__ import main
from medexgen_lib.config import load_config
from medexgen_lib.dataset import ReportDataset
from medexgen_lib.evaluate import (R2GEN_SPLIT_SIZES, baseline_predictions, comparability, comparison_table,
                                   read_predictions_file, run_evaluation, score_predictions_file)
from medexgen_lib.metrics import is_degenerate, text_metrics
from medexgen_lib.model import ReportGenerator
from medexgen_lib.preprocess import load_split
from medexgen_lib.reporting import generate_reports


@pytest.fixture(scope="module")
def cfg(trained_tiny):
    """The shared tiny run (conftest): phantom data, preprocessing, a model in models/final."""
    return trained_tiny[0]


def test_end_to_end_evaluation_writes_predictions_and_metrics(cfg):
    summary = run_evaluation(cfg, progress=False)
    rows = json.loads((cfg.paths.logs / "predictions_test.json").read_text())
    saved = json.loads((cfg.paths.logs / "metrics_test.json").read_text())
    assert len(rows) == summary["n"] == saved["n"] == len(load_split(cfg, "test"))
    for key in ("uid", "images", "reference", "prediction", "BLEU-4", "ROUGE-L",
                "reference_labels", "prediction_labels"):
        assert key in rows[0]
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "clinical macro_F1", "distinct_predictions"):
        assert key in saved["model"]
    assert set(saved["baselines"]) == {"constant (most frequent)", "constant (best of top 50 on val)",
                                       "retrieval (nearest image)"}
    assert saved["decode"]["max_new_tokens"] == cfg.eval.max_new_tokens and len(saved["model_sha256"]) == 64
    assert "R2Gen" in saved["normalisation"]
    # degenerate output is judged on the decoder's own text too; post-processing changes are counted
    assert saved["model"]["degenerate_predictions"] == sum(is_degenerate(r["prediction"], r["decoder_text"])
                                                           for r in rows)
    assert saved["model"]["reports_changed_by_post_processing"] == sum(r["prediction"] != r["decoder_text"]
                                                                       for r in rows)
    # Phantom data, findings+impression, our own split, full references: four stated mismatches.
    assert saved["references"] == "full" and saved["comparability"]["target"] == "findings+impression"
    assert len(saved["warnings"]) == 4 and "phantom" in saved["warnings"][0]
    assert all(w in saved["published_note"] for w in saved["warnings"])
    table = comparison_table(saved)
    assert {"model", "retrieval (nearest image)", "R2Gen (Chen et al., 2020)"} <= set(table.index)
    published_note = table.loc["R2Gen (Chen et al., 2020)", "note"]
    assert published_note.count("NOT COMPARABLE") == 1 and "FINDINGS only" in published_note
    assert table.loc["model", "note"].startswith("this run: data phantom, target findings+impression")
    assert table.attrs["warnings"] == saved["warnings"]


def test_comparability_states_each_mismatch_with_published_work(tmp_path):
    r2gen_like = load_config("full", {"data.source": "folder", "split.annotation_file": str(tmp_path / "a.json"),
                                      "eval.references": "r2gen"})
    meta = {"source": "annotation:a.json", "counts": {k: {"studies": v} for k, v in R2GEN_SPLIT_SIZES.items()}}
    settings, warnings = comparability(r2gen_like, meta)
    assert warnings == [] and settings["target"] == "findings" and settings["references"] == "r2gen"
    table = comparison_table({"model": {"BLEU-4": 0.1}, "baselines": {},
                              "published": {"R2Gen (Chen et al., 2020)": {"BLEU-4": 0.165}},
                              "comparability": settings, "warnings": warnings})
    assert "NOT COMPARABLE" not in table.loc["R2Gen (Chen et al., 2020)", "note"]
    assert "exactly" not in table.loc["R2Gen (Chen et al., 2020)", "note"]
    meta["counts"]["test"] = {"studies": 500}
    _, warnings = comparability(load_config("full", {"data.source": "folder", "text.target": "findings+impression",
                                                     "split.annotation_file": "a.json"}), meta)
    assert len(warnings) == 3 and "FINDINGS only" in warnings[0] and "'test': 500" in warnings[1]
    assert "eval.references r2gen" in warnings[2]
    meta["counts"]["test"] = {"studies": R2GEN_SPLIT_SIZES["test"]}
    settings, warnings = comparability(r2gen_like, meta, "val")  # val numbers beside published test ones
    assert warnings == ["scored on the val split; published numbers are on the test split"]
    assert settings["scored"] == "val"


def test_generate_reports_refuses_a_loader_out_of_step_with_the_examples(trained_tiny):
    _, model, test, _ = trained_tiny

    class Shifted(ReportDataset):  # a loader that yields the studies in another order
        def __getitem__(self, index):
            return super().__getitem__((index + 1) % len(self))

    shifted = copy.copy(test)
    shifted.__class__ = Shifted
    with pytest.raises(RuntimeError, match="another order"):
        generate_reports(model, shifted, dataclasses.replace(load_config("demo").eval, max_new_tokens=2),
                         progress=False)


def test_evaluation_encodes_each_study_once_and_shared_features_change_nothing(cfg, monkeypatch):
    from functools import partial

    from medexgen_lib.dataset import collate
    from medexgen_lib.features import FrozenFeatures

    model = ReportGenerator.from_pretrained(cfg.paths.models / "final")
    train, val, test = (load_split(cfg, split) for split in ("train", "val", "test"))
    features = FrozenFeatures(model, test, partial(collate, pad_token_id=model.config.pad_token_id), "cpu",
                              cfg.eval.batch_size)
    assert baseline_predictions(model, train, val, test, eval_features=features) \
        == baseline_predictions(model, train, val, test)
    assert generate_reports(model, test, cfg.eval, progress=False, features=features) \
        == generate_reports(model, test, cfg.eval, progress=False)
    encoded = []
    original = ReportGenerator.image_features
    monkeypatch.setattr(ReportGenerator, "image_features", lambda self, images, view_mask=None: (
        encoded.append(images.shape[0]), original(self, images, view_mask))[1])
    run_evaluation(cfg, progress=False)
    assert sum(encoded) == len(train) + len(test)  # retrieval's train search, and the test split once


def test_baselines(cfg):
    model = ReportGenerator.from_pretrained(cfg.paths.models / "final")
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    guesses = baseline_predictions(model, train, val, train)
    texts = [e.text for e in train.examples]
    assert set(guesses["constant (most frequent)"]) == {Counter(texts).most_common(1)[0][0]}
    refs = [e.text for e in val.examples]
    best = guesses["constant (best of top 50 on val)"][0]
    assert all(text_metrics(refs, [best] * len(refs))["BLEU-4"] >=
               text_metrics(refs, [t] * len(refs))["BLEU-4"] - 1e-12 for t, _ in Counter(texts).most_common(50))
    # Retrieving the training set from itself finds each study's own report.
    assert guesses["retrieval (nearest image)"] == texts


def test_scoring_a_predictions_file_from_outside(cfg, tmp_path, capsys):
    test = load_split(cfg, "test")
    csv_path = tmp_path / "preds.csv"
    csv_path.write_text("id,prediction\n" + "".join(
        f'{e.uid}_IM-0001,"{e.text}"\n' for e in test.examples))
    metrics = score_predictions_file(csv_path, cfg)
    assert metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # references from the studies table
    json_path = tmp_path / "preds.json"
    json_path.write_text(json.dumps([{"uid": e.uid, "prediction": "No acute disease."} for e in test.examples]))
    assert score_predictions_file(json_path, cfg)["BLEU-4"] < 0.5
    overrides = ["-p", "paths.data_dir", cfg.paths.data_dir, "-p", "paths.output_dir", cfg.paths.output_dir]
    assert main(["score", str(csv_path), *overrides, "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert f"{'BLEU-4':<32}1.0000" in printed and "WARNING" not in printed
    assert f"0 from the file's 'reference' column, {len(test)} from the studies table" in printed
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["BLEU-4"] == pytest.approx(metrics["BLEU-4"]) and saved["references"] == "full"
    assert saved["coverage"] == {"split": "test", "studies_in_split": len(test), "scored": len(test),
                                 "missing": 0, "outside_split": 0}


def test_scoring_a_file_counts_missing_and_refuses_duplicate_ids(cfg, tmp_path, capsys):
    test, train = load_split(cfg, "test"), load_split(cfg, "train")
    rows = [{"uid": e.uid, "prediction": e.text} for e in test.examples[1:]] + \
        [{"uid": train.examples[0].uid, "prediction": "Heart size normal."}]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(rows))
    metrics = score_predictions_file(path, cfg)
    assert metrics["coverage"]["missing"] == 1 and metrics["coverage"]["outside_split"] == 1
    assert metrics["n"] == len(test) and len(metrics["warnings"]) == 2
    assert f"1 of the {len(test)} test studies have no prediction" in metrics["warnings"][0]
    overrides = ["-p", "paths.data_dir", cfg.paths.data_dir, "-p", "paths.output_dir", cfg.paths.output_dir]
    assert main(["score", str(path), *overrides]) == 0
    assert capsys.readouterr().out.count("WARNING") == 2
    path.write_text(json.dumps(rows + rows[:2]))
    with pytest.raises(ValueError, match=r"2 id\(s\) appear more than once \(2 extra rows\)"):
        score_predictions_file(path, cfg)


def test_scoring_a_file_under_r2gens_reference_convention(cfg, tmp_path):
    r2gen = copy.deepcopy(cfg)
    r2gen.eval.references = "r2gen"
    test = load_split(cfg, "test")
    path = tmp_path / "preds.json"
    path.write_text(json.dumps([{"uid": e.uid, "prediction": e.text} for e in test.examples]))
    full, cut = score_predictions_file(path, cfg), score_predictions_file(path, r2gen)
    assert full["references"] == "full" and cut["references"] == "r2gen"
    train_n = len(load_split(cfg, "train"))
    assert f"this run's {train_n} training reports" in cut["reference_convention"]


@pytest.mark.parametrize("content, message", [
    ("uid,text\nCXR1,x\n", "needs an 'uid'"),
    ("[]", "holds no rows"),
    ("id,prediction\nCXR999999,x\n", "not in the studies table"),
])
@pytest.mark.reliability
def test_bad_predictions_files_are_named(cfg, tmp_path, content, message):
    path = tmp_path / ("p.json" if content.startswith("[") else "p.csv")
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        score_predictions_file(path, cfg)
    with pytest.raises(FileNotFoundError):
        read_predictions_file(tmp_path / "missing.csv")


def test_only_an_image_suffix_is_cut_from_a_predictions_file_id(tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("id,prediction\nCXR1573_IM-0374-1001,a\nCXR12_IM-0001,b\nsite_a_17,c\nsite_a_18,d\n")
    # R2Gen's image ids name their study; a folder dataset's own uids may hold underscores
    assert [r["uid"] for r in read_predictions_file(path)] == ["CXR1573", "CXR12", "site_a_17", "site_a_18"]


def test_drawn_findings_stated_are_scored_for_model_and_baselines_on_the_real_text_phantom(cfg, tmp_path):
    import shutil

    from medexgen_lib.realtext import TRUTH_FILE, load_truth, stated_findings

    data = shutil.copytree(cfg.paths.data_dir, tmp_path / "data")
    out = shutil.copytree(cfg.paths.output_dir, tmp_path / "out")
    local = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, data_dir=str(data), output_dir=str(out)))
    uids = [e.uid for e in load_split(local, "test").examples]
    studies = [{"uid": uid, "findings": {"cardiomegaly": ""} if i % 2 else {}} for i, uid in enumerate(uids)]
    (data / "reports" / TRUTH_FILE).write_text(json.dumps({"studies": studies}))
    summary = run_evaluation(local, progress=False)
    rows = json.loads((out / "logs" / "predictions_test.json").read_text())
    truth = load_truth(data / "reports")
    expected = stated_findings({r["uid"]: r["prediction"] for r in rows}, truth)
    assert {k: summary["model"][k] for k in expected} == expected
    assert summary["model"]["drawn_studies"] == len(uids) // 2
    for name, values in summary["baselines"].items():
        guesses = {r["uid"]: r["baseline_predictions"][name] for r in rows}
        assert values["drawn_recall"] == stated_findings(guesses, truth)["drawn_recall"]
    assert "drawn_recall" in comparison_table(summary).columns


def test_score_reads_the_column_it_is_told_to(cfg, tmp_path, capsys):
    test = load_split(cfg, "test")
    both = tmp_path / "both.json"
    both.write_text(json.dumps([{"uid": e.uid, "prediction": "No acute disease.", "decoder_text": e.text}
                                for e in test.examples]))
    assert score_predictions_file(both, cfg, field="decoder_text")["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert score_predictions_file(both, cfg)["BLEU-4"] < 0.5
    overrides = ["-p", "paths.data_dir", cfg.paths.data_dir, "-p", "paths.output_dir", cfg.paths.output_dir]
    assert main(["score", str(both), *overrides, "--field", "decoder_text"]) == 0
    assert f"{'BLEU-4':<32}1.0000" in capsys.readouterr().out
    assert main(["score", str(both), *overrides, "--field", "draft"]) == 1
    assert "needs an 'uid' (or 'id') and a 'draft'" in capsys.readouterr().err


def test_comparability_takes_a_data_sets_own_split_for_what_it_is():
    meta = {"source": "source:annotation", "counts": {k: {"studies": v} for k, v in R2GEN_SPLIT_SIZES.items()}}
    r2gen_iu = load_config("full", {"data.source": "annotation", "eval.references": "r2gen"})
    assert comparability(r2gen_iu, meta)[1] == []  # R2Gen's IU annotation.json as the source: R2Gen's split
    meta["counts"]["test"] = {"studies": 3858}
    _, warnings = comparability(load_config("mimic"), {**meta, "source": "source:mimic"})
    assert warnings[0] == "MIMIC-CXR data: the published numbers beside these are IU X-Ray's"
    assert "split from the mimic source has" in warnings[1] and not any("this project's" in w for w in warnings)
