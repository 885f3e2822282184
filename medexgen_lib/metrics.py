"""Text and clinical metrics, comparable with published IU X-Ray numbers.

Text metrics use pycocoevalcap (BLEU-1..4 corpus level, ROUGE-L with beta 1.2,
CIDEr, METEOR where Java is installed) on R2Gen's normalisation, which is what
published IU X-Ray results use; ROUGE-1/2/L F1 from rouge-score are reported
beside them, labelled as such. Clinical metrics come from ``labeler``.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence

from medexgen_lib.labeler import (LABELER_VERSION, NO_FINDING, OBSERVATIONS, SUPPORT_DEVICES, label_report,
                                  positive_set)
from medexgen_lib.nltk_bleu import seed_style_bleu

log = logging.getLogger(__name__)

METRICS_VERSION = "1"  # bump when any metric or the normalisation changes
NORMALISATION = (
    "R2Gen clean_report_iu_xray, verbatim: '..' -> '.', list numbering '1. '..'5. ' removed, "
    "lowercase, split into sentences at '. ', characters matching [.,?;*!%^&_+():-\\[\\]{}] and "
    "\" / \\ ' removed in each sentence (the class's ')-[' range also removes digits and <=>?@), "
    "sentences joined with ' . ' plus a final ' .'; 'xxxx' kept as a word")
_R2GEN_CHARS = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def normalise(report: str) -> str:
    """R2Gen's IU X-Ray report normalisation (the one published BLEU/ROUGE figures use)."""
    text = (report or "").replace("..", ".").replace("..", ".").replace("..", ".")
    text = text.replace("1. ", "").replace(". 2. ", ". ").replace(". 3. ", ". ").replace(". 4. ", ". ")
    text = text.replace(". 5. ", ". ").replace(" 2. ", ". ").replace(" 3. ", ". ").replace(" 4. ", ". ")
    text = text.replace(" 5. ", ". ").strip().lower()
    sentences = [_R2GEN_CHARS.sub("", s.replace('"', "").replace("/", "").replace("\\", "")
                                  .replace("'", "").strip().lower()) for s in text.split(". ")]
    return " . ".join(sentences) + " ."


def text_metrics(references: Sequence[str], predictions: Sequence[str], meteor: bool = False) -> dict:
    """Corpus BLEU-1..4, ROUGE-L (beta 1.2), CIDEr [, METEOR] on normalised text."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [normalise(r)] for i, r in enumerate(references)}
    res = {i: [normalise(p)] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    out.update({"ROUGE-L": float(rouge_l), "CIDEr": float(cider)})
    if meteor:
        if shutil.which("java"):
            from pycocoevalcap.meteor.meteor import Meteor
            scorer = Meteor()
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
            del scorer
        else:
            out["METEOR"] = None
            out["METEOR_skipped"] = "java not installed"
    return out


def rouge_score_f1(references: Sequence[str], predictions: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F1 from Google's rouge-score on normalised text."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ref, pred in zip(references, predictions):
        scores = scorer.score(normalise(ref), normalise(pred))
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(1, len(references))
    return {f"rouge-score ROUGE-{k[5:]} F1": v / n for k, v in totals.items()}


def per_sample_text_scores(reference: str, prediction: str) -> dict:
    """Sentence-level BLEU-4 and ROUGE-L (pycocoevalcap conventions) for one pair."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = {0: [normalise(reference)]}, {0: [normalise(prediction)]}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-4": float(bleu[3]), "ROUGE-L": float(Rouge().compute_score(gts, res)[0])}


def clinical_metrics(reference_labels: Sequence[dict], predicted_labels: Sequence[dict],
                     observations: Sequence[str] = OBSERVATIONS,
                     uncertain_as_positive: bool = False) -> dict:
    """Per-observation precision/recall/F1 (positive class), micro/macro, example F1, abnormal recall.

    Macro averages the observations that occur (positive) in the references.
    """
    observations = tuple(observations)
    refs = [positive_set(l, uncertain_as_positive, observations) for l in reference_labels]
    preds = [positive_set(l, uncertain_as_positive, observations) for l in predicted_labels]
    per_observation, tp_all, fp_all, fn_all = {}, 0, 0, 0
    for obs in observations:
        tp = sum(obs in r and obs in p for r, p in zip(refs, preds))
        fp = sum(obs not in r and obs in p for r, p in zip(refs, preds))
        fn = sum(obs in r and obs not in p for r, p in zip(refs, preds))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_observation[obs] = {"precision": precision, "recall": recall, "f1": f1,
                                "support": tp + fn, "predicted": tp + fp}
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    present = [o for o in observations if per_observation[o]["support"] > 0]
    micro_p = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
    micro_r = tp_all / (tp_all + fn_all) if tp_all + fn_all else 0.0
    example_f1 = [1.0 if not r and not p else 2 * len(r & p) / (len(r) + len(p)) for r, p in zip(refs, preds)]
    findings = set(observations) - {NO_FINDING, SUPPORT_DEVICES}
    abnormal = [(r & findings, p & findings) for r, p in zip(refs, preds) if r & findings]
    return {
        "macro_F1": sum(per_observation[o]["f1"] for o in present) / len(present) if present else 0.0,
        "micro_F1": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
        "example_F1": sum(example_f1) / len(example_f1) if example_f1 else 0.0,
        "abnormal_recall": sum(bool(p) for _, p in abnormal) / len(abnormal) if abnormal else 0.0,
        "observations": list(observations),
        "uncertain_as_positive": uncertain_as_positive,
        "per_observation": per_observation,
    }


def diversity(predictions: Sequence[str], training_reports: Sequence[str] = ()) -> dict:
    """Distinct predictions / n, distinct-1/2 over all predicted tokens, share copied from training."""
    normalised = [normalise(p) for p in predictions]
    tokens = [t.split() for t in normalised]
    unigrams = [w for ts in tokens for w in ts]
    bigrams = [tuple(ts[i:i + 2]) for ts in tokens for i in range(len(ts) - 1)]
    train = {normalise(t) for t in training_reports}
    n = max(1, len(predictions))
    return {"distinct_predictions": len(set(normalised)) / n,
            "distinct_1": len(set(unigrams)) / max(1, len(unigrams)),
            "distinct_2": len(set(bigrams)) / max(1, len(bigrams)),
            "copied_from_training": sum(p in train for p in normalised) / n if train else None}


def score(references: Sequence[str], predictions: Sequence[str], meteor: bool = False,
          observations: Sequence[str] = OBSERVATIONS, uncertain_as_positive: bool = False) -> dict:
    """All text and clinical metrics for two equal-length lists of raw report strings."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("nothing to score: no references")
    out = text_metrics(references, predictions, meteor=meteor)
    out.update(rouge_score_f1(references, predictions))
    out.update(seed_style_bleu([normalise(r).split() for r in references],
                               [normalise(p).split() for p in predictions]))
    clinical = clinical_metrics([label_report(r) for r in references],
                                [label_report(p) for p in predictions],
                                observations, uncertain_as_positive)
    out.update({f"clinical {k}": v for k, v in clinical.items()})
    out["n"] = len(references)
    out["normalisation"] = NORMALISATION
    out["metrics_version"] = METRICS_VERSION
    out["labeler_version"] = LABELER_VERSION
    return out
