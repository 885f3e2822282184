"""Seed-style BLEU with nltk: the mean of per-report ``sentence_bleu`` scores.

Many IU X-Ray notebooks (the seed project's among them) score this way. It is
not the published convention (pycocoevalcap's corpus BLEU, ``metrics.text_metrics``),
so ``metrics.score`` reports it beside that, under its own labelled keys, for
comparison with such notebooks only. Smoothing: nltk's ``SmoothingFunction().method1``
(0.1 added to n-gram orders with no match), which keeps a report with no 4-gram
match from scoring exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

SMOOTHING = "method1"
NOTE = ("nltk sentence BLEU-n: mean over reports of nltk sentence_bleu (uniform weights up to n, "
        f"SmoothingFunction().{SMOOTHING}) on the same normalised tokens; a secondary figure for "
        "comparison with notebooks that score this way. Published results use corpus BLEU (BLEU-n).")


def seed_style_bleu(references: Sequence[list[str]], predictions: Sequence[list[str]]) -> dict:
    """``{"nltk sentence BLEU-1": ..., ..., "nltk sentence BLEU note": ...}`` for token lists."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = getattr(SmoothingFunction(), SMOOTHING)
    out: dict[str, float | str] = {}
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        scores = [sentence_bleu([ref], pred, weights=weights, smoothing_function=smoothing)
                  for ref, pred in zip(references, predictions)]
        out[f"nltk sentence BLEU-{n}"] = sum(scores) / max(1, len(scores))
    out["nltk sentence BLEU note"] = NOTE
    return out
