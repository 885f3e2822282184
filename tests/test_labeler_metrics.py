"""Labeler rules on hand-written sentences; metrics on inputs with known values."""

import pytest

from medexgen_lib.labeler import ABSENT, CHEXPERT_14, NEGATIVE, POSITIVE, UNCERTAIN, label_report
from medexgen_lib.metrics import (clinical_metrics, diversity, normalise, per_sample_text_scores,
                                  rouge_score_f1, score, text_metrics)

RULES = [
    ("There is a small left pleural effusion.", "Pleural Effusion", POSITIVE),
    ("No pleural effusion.", "Pleural Effusion", NEGATIVE),
    ("No effusion, pneumothorax or consolidation.", "Consolidation", NEGATIVE),
    ("No effusion, pneumothorax or consolidation.", "Pneumothorax", NEGATIVE),
    ("Lungs are clear without focal consolidation.", "Consolidation", NEGATIVE),
    ("The lungs are free of focal airspace disease.", "Lung Opacity", NEGATIVE),
    ("Negative for pneumothorax.", "Pneumothorax", NEGATIVE),
    ("No evidence of pneumothorax.", "Pneumothorax", NEGATIVE),
    ("The previously seen effusion has resolved.", "Pleural Effusion", NEGATIVE),
    ("Resolved right lower lobe pneumonia.", "Pneumonia", NEGATIVE),
    ("Costophrenic angles are clear of effusion.", "Pleural Effusion", NEGATIVE),
    ("The heart is enlarged.", "Cardiomegaly", POSITIVE),
    ("Cardiomegaly.", "Cardiomegaly", POSITIVE),
    ("The heart is not enlarged.", "Cardiomegaly", NEGATIVE),
    ("Heart size is normal.", "Cardiomegaly", ABSENT),
    ("Opacity at the left base may represent atelectasis.", "Atelectasis", UNCERTAIN),
    ("Opacity at the left base may represent atelectasis.", "Lung Opacity", POSITIVE),
    ("Pneumonia cannot be excluded.", "Pneumonia", UNCERTAIN),
    ("Possible small right effusion.", "Pleural Effusion", UNCERTAIN),
    ("Atelectasis versus pneumonia.", "Pneumonia", UNCERTAIN),
    ("Findings suggestive of pulmonary edema.", "Edema", UNCERTAIN),
    ("No pneumothorax, but there is a small effusion.", "Pleural Effusion", POSITIVE),
    ("No pneumothorax, but there is a small effusion.", "Pneumothorax", NEGATIVE),
    ("No change in the left pleural effusion.", "Pleural Effusion", POSITIVE),
    ("Calcified granuloma in the right upper lobe.", "Granuloma", POSITIVE),
    ("Hyperinflation consistent with emphysema.", "Emphysema", POSITIVE),
    ("Small hiatal hernia.", "Hernia", POSITIVE),
    ("Stable 1 cm nodule in the right lung.", "Lung Lesion", POSITIVE),
    ("Left chest wall pacemaker in place.", "Support Devices", POSITIVE),
    ("Old healed left rib fractures.", "Fracture", POSITIVE),
    ("Mild pleural thickening at the apices.", "Pleural Other", POSITIVE),
    ("The mediastinum is widened.", "Enlarged Cardiomediastinum", ABSENT),  # phrase not covered
    ("Widened mediastinum.", "Enlarged Cardiomediastinum", POSITIVE),
]


@pytest.mark.parametrize("sentence, observation, expected", RULES)
def test_rules(sentence, observation, expected):
    assert label_report(sentence)[observation] == expected


def test_positive_beats_uncertain_beats_negative_within_a_report():
    assert label_report("No effusion. Possible effusion on the left.")["Pleural Effusion"] == UNCERTAIN
    assert label_report("Possible effusion. There is a left effusion.")["Pleural Effusion"] == POSITIVE


def test_no_finding_only_without_positive_or_uncertain_findings():
    assert label_report("No pleural effusion or pneumothorax. Normal heart.")["No Finding"] == POSITIVE
    assert label_report("Pacemaker in place. Lungs are clear.")["No Finding"] == POSITIVE
    assert label_report("Possible atelectasis.")["No Finding"] == NEGATIVE
    assert set(CHEXPERT_14) <= set(label_report(""))


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


def test_labeler_agrees_with_mesh_terms_of_the_real_sample(iuxray_sample):
    from medexgen_lib.labeler import mesh_agreement
    from medexgen_lib.reports import read_reports
    from medexgen_lib.text import target_texts

    table = read_reports(iuxray_sample / "reports")
    agreement = mesh_agreement(target_texts(table).tolist(), table.mesh_major.tolist())
    for obs in ("No Finding", "Cardiomegaly", "Lung Opacity", "Atelectasis", "Pleural Effusion",
                "Granuloma", "Emphysema"):
        assert agreement[obs]["recall_of_mesh"] >= 0.85, (obs, agreement[obs])
    for obs in ("Cardiomegaly", "Lung Opacity", "Atelectasis", "Granuloma", "Emphysema"):
        assert agreement[obs]["precision_vs_mesh"] >= 0.85, (obs, agreement[obs])
