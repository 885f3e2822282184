"""Metrics on inputs with known values (the labeler's own rules are tested in test_labeler.py)."""

import pytest

from medexgen_lib.labeler import LABELER_VERSION, label_report
from medexgen_lib.metrics import (clinical_metrics, diversity, normalise, per_sample_text_scores,
                                  rouge_score_f1, score, text_metrics)


def test_normalisation_follows_r2gen():
    assert normalise("1. Heart size normal.  2. No effusion, \"pneumothorax\". XXXX intact.") == \
        "heart size normal .  . no effusion pneumothorax . xxxx intact ."
    assert normalise("The heart is normal in size.") == "the heart is normal in size ."


def test_bleu_rouge_known_values():
    ref, pred = "The heart is normal in size.", "The heart is enlarged in size."
    # tokens: the heart is normal/enlarged in size .  -> 1-gram 6/7, 2-gram 4/6, 3-gram 2/5, 4-gram 0/4
    m = text_metrics([ref], [pred])
    assert m["BLEU-1"] == pytest.approx(6 / 7, abs=1e-6)
    assert m["BLEU-2"] == pytest.approx((6 / 7 * 4 / 6) ** 0.5, abs=1e-6)
    assert m["BLEU-3"] == pytest.approx((6 / 7 * 4 / 6 * 2 / 5) ** (1 / 3), abs=1e-6)
    assert m["BLEU-4"] < 1e-3
    assert m["ROUGE-L"] == pytest.approx(6 / 7, abs=1e-6)  # LCS 6 of 7 both ways
    same = text_metrics([ref, pred], [ref, pred])
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    rs = rouge_score_f1([ref], [pred])
    assert rs["rouge-score ROUGE-1 F1"] == pytest.approx(5 / 6, abs=1e-6)  # rouge-score drops "."
    assert per_sample_text_scores(ref, ref)["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_brevity_penalty_applies_at_corpus_level():
    ref, pred = "a b c d e f g h", "a b c d"
    m = text_metrics([ref], [pred])  # 5 vs 9 tokens with the final "."
    import math
    bp = math.exp(1 - 9 / 5)
    assert m["BLEU-1"] == pytest.approx(bp * 5 / 5, abs=1e-6)  # every predicted token matches


def test_clinical_metrics_known_values():
    refs = [label_report(t) for t in ["Left pleural effusion.", "Cardiomegaly.", "No acute disease.",
                                      "Cardiomegaly and effusion."]]
    preds = [label_report(t) for t in ["Left pleural effusion.", "No acute disease.", "Cardiomegaly.",
                                       "Cardiomegaly. No effusion."]]
    c = clinical_metrics(refs, preds, observations=("Cardiomegaly", "Pleural Effusion"))
    # Cardiomegaly: tp 1 (4th), fp 1 (3rd), fn 1 (2nd) -> P=R=F1=.5; Effusion: tp 1, fn 1 -> P 1, R .5
    assert c["per_observation"]["Cardiomegaly"]["f1"] == pytest.approx(0.5)
    assert c["per_observation"]["Pleural Effusion"]["f1"] == pytest.approx(2 / 3)
    assert [c["per_observation"][o]["support"] for o in ("Cardiomegaly", "Pleural Effusion")] == [2, 2]
    assert c["macro_F1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert c["micro_F1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # example F1: 1, 0, 0 (pred positive, ref empty), 2*1/(2+1)
    assert c["example_F1"] == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert c["abnormal_recall"] == pytest.approx(2 / 3)


def test_uncertain_counts_as_negative_unless_configured():
    refs = [label_report("Pleural effusion.")]
    preds = [label_report("Possible pleural effusion.")]
    obs = ("Pleural Effusion",)
    assert clinical_metrics(refs, preds, obs)["macro_F1"] == 0.0
    assert clinical_metrics(refs, preds, obs, uncertain_as_positive=True)["macro_F1"] == 1.0


def test_constant_normal_report_scores_low_clinically():
    refs = ["Cardiomegaly.", "Left pleural effusion.", "Right pneumothorax.", "No acute disease."]
    constant = ["No acute disease. No effusion or pneumothorax. Heart size normal."] * 4
    result = score(refs, constant)
    assert result["clinical macro_F1"] < 0.2 and result["clinical abnormal_recall"] == 0.0
    assert result["n"] == 4 and "R2Gen" in result["normalisation"]
    assert result["labeler_version"] == LABELER_VERSION
    with pytest.raises(ValueError, match="4 references but 3"):
        score(refs, constant[:3])


def test_diversity():
    d = diversity(["a b", "a b", "c d"], training_reports=["c d"])
    assert d["distinct_predictions"] == pytest.approx(2 / 3)
    assert d["copied_from_training"] == pytest.approx(1 / 3)


def test_cider_is_ten_for_identical_corpora_and_lower_otherwise():
    refs = ["heart size normal.", "small left pleural effusion.", "right apical pneumothorax."]
    assert text_metrics(refs, refs)["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    # reversed: only the middle report matches; the others share just ".", whose idf is 0
    assert text_metrics(refs, refs[::-1])["CIDEr"] == pytest.approx(10 / 3, abs=1e-6)


def test_meteor_is_recorded_as_skipped_without_java(monkeypatch):
    import medexgen_lib.metrics as metrics
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    m = text_metrics(["a b c"], ["a b c"], meteor=True)
    assert m["METEOR"] is None and "java" in m["METEOR_skipped"]
