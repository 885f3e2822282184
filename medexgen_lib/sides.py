"""Sentences and sides in report text: the sentence split every text edit uses, which observations a
text states, and which side(s) a report names for each sided observation ("left", "right",
"bilateral"). Read by the head's training labels (``guidance``), the text edits
(``report_edits``, ``planning``) and the laterality metric (``metrics``)."""

from __future__ import annotations

import re

from medexgen_lib.labeler import POSITIVE, UNCERTAIN, label_report

SIDED_OBSERVATIONS = ("Pleural Effusion", "Pneumothorax", "Lung Lesion", "Consolidation")
SIDES = ("left", "right")
# Sentence ends (kept by split: even pieces are sentences, odd ones their ends) and side words
# ("bilateral", "bilaterally" and "both" name both sides).
SENTENCE_PIECES = re.compile(r"((?<!\d)[.;!?](?!\d)|\n)")
SIDE_WORD = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b")  # in lowercased text
SIDE_WORD_ANY_CASE = re.compile(SIDE_WORD.pattern, re.IGNORECASE)  # where the text keeps its case


def side_label(observation: str, side: str) -> str:
    """The label name for ``observation`` on ``side`` (e.g. ``"Pleural Effusion, left"``)."""
    return f"{observation}, {side}"


def report_sides(text: str) -> dict[str, set[str]]:
    """Sided observations the report states (positive or uncertain) -> the sides named in the
    same sentence ({"left"}, {"right"}, both for "bilateral"; empty when no side is named)."""
    sides: dict[str, set[str]] = {}
    for sentence in SENTENCE_PIECES.split(text or "")[::2]:
        if not sentence.strip():
            continue
        labels = label_report(sentence)
        words = set(SIDE_WORD.findall(sentence.lower()))
        named = set(SIDES) if words - set(SIDES) else words
        for observation in SIDED_OBSERVATIONS:
            if labels.get(observation) in (POSITIVE, UNCERTAIN):
                sides.setdefault(observation, set()).update(named)
    return sides


def split_sentences(text: str) -> list[str]:
    """``text``'s sentences, each with its end (``SENTENCE_PIECES``: not "1." nor "2.5")."""
    pieces = SENTENCE_PIECES.split(text or "") + [""]
    return [(pieces[at] + pieces[at + 1]).strip() for at in range(0, len(pieces) - 1, 2)
            if pieces[at].strip()]


def stated_observations(labels: dict[str, str]) -> set[str]:
    """The observations ``label_report``'s ``labels`` state (positive or uncertain), "No Finding" aside."""
    return {o for o, v in labels.items() if v in (POSITIVE, UNCERTAIN) and o != "No Finding"}
