"""Stage 05 end to end with a tiny model on phantom data; baselines; scoring files."""

import json
from collections import Counter

import pytest

from medexgen_lib.__main__ import main
from medexgen_lib.evaluate import (baseline_predictions, comparison_table, read_predictions_file,
                                   run_evaluation, score_predictions_file)
from medexgen_lib.metrics import text_metrics
from medexgen_lib.model import ReportGenerator
from medexgen_lib.preprocess import load_split


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
    table = comparison_table(saved)
    assert {"model", "retrieval (nearest image)", "R2Gen (Chen et al., 2020)"} <= set(table.index)


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
    assert "BLEU-4" in capsys.readouterr().out and (tmp_path / "m.json").exists()


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
