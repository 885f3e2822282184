"""Text and clinical metrics, comparable with published IU X-Ray numbers.

Text metrics use pycocoevalcap (BLEU-1..4 corpus level, ROUGE-L with beta 1.2,
CIDEr, METEOR where Java is installed) on R2Gen's normalisation, which is what
published IU X-Ray results use; ROUGE-1/2/L F1 from rouge-score are reported
beside them, labelled as such. Clinical metrics come from ``labeler``.

Two reference conventions (``eval.references``): ``full`` scores against the whole
cleaned reference; ``r2gen`` reproduces how R2Gen-family papers scored (their
tokenizer: words seen fewer than 3 times in training become ``<unk>``, references
cut at ``max_seq_length`` 60); ``r2gen-mimic`` is the same with R2Gen's MIMIC-CXR settings
(threshold 10, ``max_seq_length`` 100). Every result says which one it used.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medexgen_lib.labeler import (ABSENT, LABELER_VERSION, NO_FINDING, OBSERVATIONS, POSITIVE, SUPPORT_DEVICES,
                                  label_report, positive_set)
from medexgen_lib.nltk_bleu import seed_style_bleu
from medexgen_lib.sides import SIDES, report_sides
from medexgen_lib.text import ANONYMISED

log = logging.getLogger(__name__)

METRICS_VERSION = "3"  # bump when any metric or the normalisation changes
# The numbers a validation during training computes (``score`` without METEOR, plus the share of
# distinct predictions): what ``train.selection_metric`` may name, checked by ``load_config``.
VALIDATION_METRICS = (
    "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L", "clinical abnormal_recall",
    "clinical example_F1", "clinical macro_F1", "clinical macro_F1 (observations in references or predictions)",
    "clinical macro_F1 (observations in references)", "clinical micro_F1", "degenerate_predictions",
    "degenerate_predictions_share", "distinct_predictions", "empty_predictions", "n",
    "nltk sentence BLEU-1", "nltk sentence BLEU-2", "nltk sentence BLEU-3", "nltk sentence BLEU-4",
    "rouge-score ROUGE-1 F1", "rouge-score ROUGE-2 F1", "rouge-score ROUGE-L F1")
NORMALISATION = (
    "R2Gen clean_report_iu_xray, verbatim: '..' -> '.', list numbering '1. '..'5. ' removed, "
    "lowercase, split into sentences at '. ', characters matching [.,?;*!%^&_+():-\\[\\]{}] and "
    "\" / \\ ' removed in each sentence (the class's ')-[' range also removes digits and <=>?@), "
    "sentences joined with ' . ' plus a final ' .'; 'xxxx' kept as a word")
_R2GEN_CHARS = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")

REFERENCE_CONVENTIONS = ("full", "r2gen", "r2gen-mimic")
# R2Gen (cuhksz-nlp/R2Gen): modules/tokenizers.py keeps words seen >= threshold (3) times in
# the training reports, others become <unk>; modules/datasets.py cuts [0] + ids + [0] to
# max_seq_length (60) and the trainer decodes ids[1:], so a reference keeps at most 59 words.
R2GEN_THRESHOLD, R2GEN_MAX_SEQ_LENGTH, R2GEN_UNK = 3, 60, "<unk>"
R2GEN_TRAINING_REPORTS = 2069  # R2Gen's IU X-Ray training split (annotation.json), its vocabulary's source
# Per convention: (threshold, max_seq_length, training reports of R2Gen's vocabulary); "r2gen-mimic" is
# R2Gen's published MIMIC-CXR run (--threshold 10 --max_seq_length 100, 270,790 training items).
R2GEN_CONVENTIONS = {"r2gen": (R2GEN_THRESHOLD, R2GEN_MAX_SEQ_LENGTH, R2GEN_TRAINING_REPORTS),
                     "r2gen-mimic": (10, 100, 270_790)}
# R2Gen's MIMIC-CXR cleaner (clean_report_mimic_cxr) folds MIMIC's "___" de-identification marks to "_"
# and then strips "_", so they are no word there; here they are ANONYMISED ("XXXX", mimic_sections).
_DEIDENTIFIED_WORD = re.compile(rf"\b{ANONYMISED}\b", re.IGNORECASE)
REFERENCE_DESCRIPTIONS = {
    "full": "full: each reference is its whole cleaned target text (no truncation, no <unk>); "
            "references and predictions R2Gen-normalised",
    **{name: (f"{name}: R2Gen's reference convention: references and predictions R2Gen-normalised, "
              f"words seen fewer than {threshold} times in this run's {{n_train}} training "
              f"reports replaced by {R2GEN_UNK}, references cut to their first "
              f"{length - 1} words (max_seq_length {length} with the start "
              "token); predictions not cut; the vocabulary comes from this run's cleaned training text, "
              "so it matches R2Gen's only where the split and text are R2Gen's. Clinical metrics use "
              "the full references")
       for name, (threshold, length, _) in R2GEN_CONVENTIONS.items()},
}


def normalise(report: str) -> str:
    """R2Gen's IU X-Ray report normalisation (the one published BLEU/ROUGE figures use)."""
    text = (report or "").replace("..", ".").replace("..", ".").replace("..", ".")
    text = text.replace("1. ", "").replace(". 2. ", ". ").replace(". 3. ", ". ").replace(". 4. ", ". ")
    text = text.replace(". 5. ", ". ").replace(" 2. ", ". ").replace(" 3. ", ". ").replace(" 4. ", ". ")
    text = text.replace(" 5. ", ". ").strip().lower()
    sentences = [_R2GEN_CHARS.sub("", s.replace('"', "").replace("/", "").replace("\\", "")
                                  .replace("'", "").strip().lower()) for s in text.split(". ")]
    return " . ".join(sentences) + " ."


def r2gen_vocabulary(training_reports: Sequence[str], threshold: int = R2GEN_THRESHOLD) -> frozenset[str]:
    """R2Gen's vocabulary: normalised words seen at least ``threshold`` times in the training reports."""
    counts = Counter(word for report in training_reports for word in normalise(report).split())
    return frozenset(word for word, n in counts.items() if n >= threshold)


def r2gen_text(report: str, vocabulary: frozenset[str], max_words: int | None = None) -> str:
    """A report as R2Gen's tokenizer decodes it: normalised, unknown words as ``<unk>``,
    at most ``max_words`` words (references: ``R2GEN_MAX_SEQ_LENGTH - 1``)."""
    words = [w if w in vocabulary else R2GEN_UNK for w in normalise(report).split()]
    return " ".join(words[:max_words])


def r2gen_unknown_shares(references: Sequence[str], predictions: Sequence[str], n_train: int,
                         r2gen_train: int = R2GEN_TRAINING_REPORTS) -> dict:
    """How much of the r2gen-converted text became ``<unk>``, and a warning when the vocabulary
    came from fewer training reports than R2Gen's: a predicted ``<unk>`` matches a reference
    ``<unk>``, so with a small vocabulary any rare (even wrong) word scores as a match."""
    def share(texts: Sequence[str]) -> float:
        words = [w for t in texts for w in t.split()]
        return sum(w == R2GEN_UNK for w in words) / len(words) if words else 0.0

    shares = {"r2gen_unk_share_references": share(references),
              "r2gen_unk_share_predictions": share(predictions), "r2gen_training_reports": n_train}
    warnings = []
    if n_train < r2gen_train:
        warnings.append(
            f"r2gen references: vocabulary from {n_train} training reports (R2Gen's: "
            f"{r2gen_train}); {shares['r2gen_unk_share_references']:.1%} of reference words and "
            f"{shares['r2gen_unk_share_predictions']:.1%} of prediction words became {R2GEN_UNK}, and a "
            f"predicted {R2GEN_UNK} matches a reference {R2GEN_UNK}: text scores are inflated, not comparable")
    return {**shares, "warnings": warnings}


def has_words(report: str) -> bool:
    """Whether ``report`` keeps a word after the scorer's normalisation other than the
    anonymisation placeholder "xxxx" ("." or a zero-width space keep none)."""
    return any(word != "xxxx" for word in re.findall(r"[a-z0-9]+", normalise(report)))


def _wordless_as_empty(prediction: str) -> str:
    """A normalised prediction with no letter or digit (an empty one normalises to " .") as the
    empty string, so it matches no reference full stop and scores 0 on every text metric."""
    return prediction if re.search(r"[a-z0-9]", prediction) else ""


def _scorer_inputs(references: Sequence[str], predictions: Sequence[str], normalised: bool = False
                   ) -> tuple[dict, dict]:
    """pycocoevalcap's ``gts`` and ``res`` of normalised (or, ``normalised=True``, final) texts."""
    prepare = (lambda t: t) if normalised else normalise
    gts = {i: [prepare(r)] for i, r in enumerate(references)}
    res = {i: [_wordless_as_empty(prepare(p))] for i, p in enumerate(predictions)}
    return gts, res


def corpus_bleu4(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus BLEU-4 on normalised text, as ``text_metrics`` computes it (nothing else)."""
    from pycocoevalcap.bleu.bleu import Bleu

    return float(Bleu(4).compute_score(*_scorer_inputs(references, predictions), verbose=0)[0][3])


def text_metrics(references: Sequence[str], predictions: Sequence[str], meteor: bool = False,
                 normalised: bool = False) -> dict:
    """Corpus BLEU-1..4, ROUGE-L (beta 1.2), CIDEr [, METEOR] on normalised text
    (``normalised=True``: the texts are already in their final form, e.g. ``r2gen_text``)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _scorer_inputs(references, predictions, normalised)
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


def rouge_score_f1(references: Sequence[str], predictions: Sequence[str], normalised: bool = False) -> dict:
    """Mean ROUGE-1/2/L F1 from Google's rouge-score on normalised text."""
    from rouge_score import rouge_scorer

    prepare = (lambda t: t) if normalised else normalise
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ref, pred in zip(references, predictions):
        scores = scorer.score(prepare(ref), _wordless_as_empty(prepare(pred)))
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(1, len(references))
    return {f"rouge-score ROUGE-{k[5:]} F1": v / n for k, v in totals.items()}


def per_sample_text_scores(reference: str, prediction: str) -> dict:
    """Sentence-level BLEU-4 and ROUGE-L (pycocoevalcap conventions) for one pair."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = {0: [normalise(reference)]}, {0: [_wordless_as_empty(normalise(prediction))]}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-4": float(bleu[3]), "ROUGE-L": float(Rouge().compute_score(gts, res)[0])}


def clinical_counts(reference_labels: Sequence[dict], predicted_labels: Sequence[dict],
                    observations: Sequence[str] = OBSERVATIONS, uncertain_as_positive: bool = False
                    ) -> np.ndarray:
    """Per study and observation the true positive, false positive and false negative (0/1),
    shape ``[n, 3, len(observations)]``: summed over any set of studies they give that set's
    clinical F1 figures (``macro_f1_from_counts``)."""
    refs = [positive_set(l, uncertain_as_positive, tuple(observations)) for l in reference_labels]
    preds = [positive_set(l, uncertain_as_positive, tuple(observations)) for l in predicted_labels]
    counts = np.zeros((len(refs), 3, len(observations)))
    for i, (r, p) in enumerate(zip(refs, preds, strict=True)):
        for j, obs in enumerate(observations):
            counts[i, :, j] = [obs in r and obs in p, obs not in r and obs in p, obs in r and obs not in p]
    return counts


def _f1_from_counts(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per observation (0 where undefined) of summed counts ``[..., 3, O]``."""
    tp, fp, fn = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def macro_f1_from_counts(sums: np.ndarray, references_only: bool = False) -> np.ndarray:
    """Clinical macro-F1 of summed ``clinical_counts`` (``[..., 3, O]`` -> ``[...]``): the mean F1
    over the observations positive in the references OR the predictions (``references_only``:
    in the references). The one definition of the figure: ``clinical_metrics`` tables it and
    the seeds' bootstrap resamples it. Summed observation by observation, in order, so it is
    bit for bit the mean of the per-observation F1 that ``clinical_metrics`` reports."""
    _, _, f1 = _f1_from_counts(sums)
    tp, fp, fn = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
    chosen = (tp + fn > 0) if references_only else (tp + fp + fn > 0)
    total, n = np.zeros(f1.shape[:-1]), chosen.sum(-1)
    for j in range(f1.shape[-1]):
        total = total + np.where(chosen[..., j], f1[..., j], 0.0)
    return np.where(n > 0, total / np.maximum(n, 1), 0.0)


def clinical_metrics(reference_labels: Sequence[dict], predicted_labels: Sequence[dict],
                     observations: Sequence[str] = OBSERVATIONS,
                     uncertain_as_positive: bool = False) -> dict:
    """Per-observation precision/recall/F1 (positive class), micro/macro, example F1, abnormal recall.

    ``macro_F1`` (the primary figure, and ``train.selection_metric``'s default) averages the
    observations positive in the references OR the predictions, so writing a finding no
    reference has costs F1; ``macro_F1 (observations in references)`` averages only those
    positive in the references (the older convention, blind to invented findings). Both come
    from ``macro_f1_from_counts`` of ``clinical_counts``, as the seeds' bootstrap does.
    """
    observations = tuple(observations)
    refs = [positive_set(l, uncertain_as_positive, observations) for l in reference_labels]
    preds = [positive_set(l, uncertain_as_positive, observations) for l in predicted_labels]
    sums = clinical_counts(reference_labels, predicted_labels, observations, uncertain_as_positive).sum(0)
    precision, recall, f1 = _f1_from_counts(sums)
    per_observation = {}
    for j, obs in enumerate(observations):
        tp, fp, fn = (int(v) for v in sums[:, j])
        per_observation[obs] = {"precision": float(precision[j]), "recall": float(recall[j]),
                                "f1": float(f1[j]), "support": tp + fn, "predicted": tp + fp}
    tp_all, fp_all, fn_all = (int(v) for v in sums.sum(-1))
    micro_p = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
    micro_r = tp_all / (tp_all + fn_all) if tp_all + fn_all else 0.0
    example_f1 = [1.0 if not r and not p else 2 * len(r & p) / (len(r) + len(p)) for r, p in zip(refs, preds)]
    findings = set(observations) - {NO_FINDING, SUPPORT_DEVICES}
    abnormal = [(r & findings, p & findings) for r, p in zip(refs, preds) if r & findings]
    macro = float(macro_f1_from_counts(sums))
    return {
        "macro_F1": macro,
        "macro_F1 (observations in references or predictions)": macro,
        "macro_F1 (observations in references)": float(macro_f1_from_counts(sums, references_only=True)),
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


_WORDS = re.compile(r"[a-z]+")


def is_degenerate(prediction: str, decoder_text: str | None = None) -> bool:
    """Empty, whitespace or punctuation only, or fewer than two distinct words (one token
    repeated, "xxxx xxxx"): text that states nothing about the chest. With ``decoder_text`` (the
    decoder's own text, before side words and sentence bank) either being so counts: sentences
    the bank adds to "effusion effusion effusion" do not make the decoder's output a report."""
    texts = [prediction] if decoder_text is None else [prediction, decoder_text]
    return any(len(set(_WORDS.findall((text or "").lower()))) < 2 for text in texts)


def prediction_labels(prediction: str, decoder_text: str | None = None) -> dict[str, str]:
    """The labeler's labels of a prediction; a degenerate one (``is_degenerate``, judged on the
    decoder's own text too where given) states nothing, so every observation is absent,
    "No Finding" included."""
    if is_degenerate(prediction, decoder_text):
        return {obs: ABSENT for obs in OBSERVATIONS}
    return label_report(prediction)


def _check_convention(reference_convention: str, training_reports: Sequence[str] | None) -> None:
    if reference_convention not in REFERENCE_CONVENTIONS:
        raise ValueError(f"reference convention must be one of {REFERENCE_CONVENTIONS}, "
                         f"got {reference_convention!r}")
    if reference_convention in R2GEN_CONVENTIONS and not training_reports:
        raise ValueError("the r2gen reference convention needs the training reports (R2Gen's vocabulary)")


def scored_texts(references: Sequence[str], predictions: Sequence[str], reference_convention: str = "full",
                 training_reports: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """References and predictions as every text metric compares them: R2Gen-normalised, or with
    ``reference_convention="r2gen"`` as R2Gen's tokenizer decodes them (``r2gen_text``, references
    cut to 59 words; ``"r2gen-mimic"``: 99 words, and MIMIC's de-identification marks, ``XXXX``
    here, dropped as R2Gen's MIMIC cleaner drops ``___``); a prediction with no word becomes ""
    (``_wordless_as_empty``)."""
    _check_convention(reference_convention, training_reports)
    if reference_convention in R2GEN_CONVENTIONS:
        threshold, max_seq_length, _ = R2GEN_CONVENTIONS[reference_convention]
        if reference_convention == "r2gen-mimic":  # no de-identification word, as R2Gen's MIMIC cleaner
            references, predictions, training_reports = (
                [_DEIDENTIFIED_WORD.sub(" ", t) for t in texts]
                for texts in (references, predictions, training_reports))
        vocabulary = r2gen_vocabulary(training_reports, threshold)
        refs = [r2gen_text(r, vocabulary, max_seq_length - 1) for r in references]
        preds = [r2gen_text(p, vocabulary) for p in predictions]
    else:
        refs, preds = [normalise(r) for r in references], [normalise(p) for p in predictions]
    return refs, [_wordless_as_empty(p) for p in preds]


def clinical_labels(references: Sequence[str], predictions: Sequence[str],
                    decoder_texts: Sequence[str | None] | None = None) -> tuple[list[dict], list[dict]]:
    """The labels clinical F1 compares: ``label_report`` of each (whole) reference and
    ``prediction_labels`` of each prediction (a degenerate one, or one whose decoder text in
    ``decoder_texts`` is, states nothing)."""
    drafts = [None] * len(predictions) if decoder_texts is None else decoder_texts
    return ([label_report(r) for r in references],
            [prediction_labels(p, d) for p, d in zip(predictions, drafts, strict=True)])


def study_statistics(references: Sequence[str], predictions: Sequence[str], uncertain_as_positive: bool = False,
                     reference_convention: str = "full", training_reports: Sequence[str] | None = None,
                     observations: Sequence[str] = OBSERVATIONS,
                     decoder_texts: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:
    """Per-study sufficient statistics of ``score``'s corpus BLEU-4 (pycocoevalcap's n-gram counts of
    ``scored_texts``) and clinical macro-F1 (``clinical_counts`` of ``clinical_labels``), built by
    ``score``'s own steps, so that any resample of studies is scored by sums exactly as ``score``
    would score it: ``{"bleu": [n, 10], "clinical": [n, 3, O]}``."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    refs, preds = scored_texts(references, predictions, reference_convention, training_reports)
    bleu = np.zeros((len(refs), 10))  # guess x4, correct x4, testlen, reflen
    for i, (ref, pred) in enumerate(zip(refs, preds, strict=True)):
        comps = cook_test(pred, cook_refs([ref]))
        bleu[i] = [*comps["guess"], *comps["correct"], comps["testlen"], comps["reflen"][0]]
    clinical = clinical_counts(*clinical_labels(references, predictions, decoder_texts), observations,
                               uncertain_as_positive)
    return {"bleu": bleu, "clinical": clinical}


def score(references: Sequence[str], predictions: Sequence[str], meteor: bool = False,
          observations: Sequence[str] = OBSERVATIONS, uncertain_as_positive: bool = False,
          reference_convention: str = "full", training_reports: Sequence[str] | None = None,
          decoder_texts: Sequence[str | None] | None = None) -> dict:
    """All text and clinical metrics for two equal-length lists of raw report strings.

    ``reference_convention`` is ``"full"``, ``"r2gen"`` or ``"r2gen-mimic"`` (need ``training_reports``
    for R2Gen's vocabulary); the result names the one used. Degenerate predictions
    (``is_degenerate``; where ``decoder_texts`` gives the decoder's own text before side words
    and sentence bank, judged on that too) are counted and labelled with nothing, so they get
    no clinical credit, "No Finding" included; ``reports_changed_by_post_processing`` counts the
    predictions that differ from their decoder text (None without ``decoder_texts``). Text
    metrics compare ``scored_texts``, clinical ones ``clinical_labels`` (as ``study_statistics``
    does for the seeds' bootstrap).
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if decoder_texts is not None and len(decoder_texts) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(decoder_texts)} decoder texts")
    if not references:
        raise ValueError("nothing to score: no references")
    texts = scored_texts(references, predictions, reference_convention, training_reports)
    out = text_metrics(*texts, meteor=meteor, normalised=True)
    out.update(rouge_score_f1(*texts, normalised=True))
    description, shares = REFERENCE_DESCRIPTIONS["full"], {"warnings": []}
    if reference_convention in R2GEN_CONVENTIONS:
        description = REFERENCE_DESCRIPTIONS[reference_convention].format(n_train=len(training_reports))
        shares = r2gen_unknown_shares(*texts, len(training_reports), R2GEN_CONVENTIONS[reference_convention][2])
    out.update(seed_style_bleu([t.split() for t in texts[0]], [t.split() for t in texts[1]]))
    drafts = [None] * len(predictions) if decoder_texts is None else decoder_texts
    degenerate = [is_degenerate(p, d) for p, d in zip(predictions, drafts)]
    clinical = clinical_metrics(*clinical_labels(references, predictions, decoder_texts), observations,
                                uncertain_as_positive)
    out.update({f"clinical {k}": v for k, v in clinical.items()})
    out.update(shares)
    out["n"] = len(references)
    out["empty_predictions"] = sum(not (p or "").strip() for p in predictions)
    out["degenerate_predictions"] = sum(degenerate)
    out["degenerate_predictions_share"] = sum(degenerate) / len(predictions)
    out["reports_changed_by_post_processing"] = (None if decoder_texts is None else
                                                 sum(d is not None and d != p for p, d in zip(predictions, drafts)))
    out["references"] = reference_convention
    out["reference_convention"] = description
    out["normalisation"] = NORMALISATION
    out["metrics_version"] = METRICS_VERSION
    out["labeler_version"] = LABELER_VERSION
    return out


# --------------------------------------------------------------------------- laterality

# Phantom finding name -> the labeler's observation, for the findings that have a side.
PHANTOM_SIDED = {"effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
                 "nodule": "Lung Lesion", "consolidation": "Consolidation"}


def phantom_sides(findings: dict[str, str]) -> dict[str, set[str]]:
    """A phantom study's drawn findings (``phantom_findings.json``) -> sided observation -> sides."""
    out = {}
    for name, observation in PHANTOM_SIDED.items():
        if name in findings:
            side = findings[name].split("-")[0]  # nodules: "left-upper-mass"
            out[observation] = set(SIDES) if side == "bilateral" else {side}
    return out


def load_phantom_truth(reports_dir: str | Path) -> dict[str, dict[str, set[str]]] | None:
    """uid -> sided observations with their true sides, from the phantom's ground truth file;
    None where the data are not the phantom (no such file)."""
    from medexgen_lib.phantom import TRUTH_FILE

    path = Path(reports_dir) / TRUTH_FILE
    if not path.exists():
        return None
    try:
        studies = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"phantom ground truth {path} is not valid JSON: {exc}") from None
    return {f"CXR{s['number']}": phantom_sides(s["findings"]) for s in studies}


def laterality(truth: dict[str, dict[str, set[str]]], uids: Sequence[str],
               predictions: Sequence[str]) -> dict:
    """Of the sided findings in ``truth`` that a report detects (labeler: positive), the share
    whose side the report gets right (sides named in the finding's sentences equal the truth;
    bilateral = both). Counts are returned beside the share (None when nothing was detected)."""
    detected = correct = total = 0
    for uid, prediction in zip(uids, predictions, strict=True):
        expected = truth.get(uid, {})
        if not expected:
            continue
        labels = label_report(prediction)
        stated = report_sides(prediction)
        for observation, sides in expected.items():
            total += 1
            if labels.get(observation) == POSITIVE:
                detected += 1
                correct += stated.get(observation, set()) == sides
    return {"laterality": correct / detected if detected else None, "laterality_correct": correct,
            "laterality_detected": detected, "laterality_findings": total}
