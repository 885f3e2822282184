"""Sentence planning: each report in radiologists' usual wording, with the head's findings in it.

A post-processing step on the decoder's text (``guidance.plan_reports``), applied after decoding
with the head's side words (``postprocess.post_process`` returns the decoder's text beside
the planned one; stage 05 counts the reports it changed). On real reports most studies are normal and
radiologists phrase a normal study in a few habitual ways; a decoder's likeliest normal report is
not one of them, and a decoder unsure of a finding falls back to it. The plan:

- the **normal report** (``normal_report``): of the 50 most frequent training reports, the one with
  the best BLEU-4 on val (the "constant (best of top 50 on val)" baseline's choice);
- each finding the observation head predicts (``present``) is stated by the sentence bank's
  sentence (``report_edits.sentence_bank``: the wording radiologists repeat most) for the finding on
  the head's sides; where the bank has none for exactly that, by the decoder's own sentence if it
  wrote one stating only findings the head predicts; else by the bank's sentence for the finding
  without a side, or on another side with its side word set to the head's;
- it goes where the normal report's sentence about the same anatomy was ("The heart is normal in
  size." makes way for a cardiomegaly sentence); a normal sentence that negates a present finding
  keeps what else it says ("No large pleural effusion or pneumothorax." beside an effusion keeps
  "No pneumothorax."), and one that calls the lungs clear stays after the finding as
  "otherwise clear", as radiologists write it. Anything left over goes before the normal report's
  last sentence.

A study with no finding predicted gets the normal report. Decoder sentences stating a finding
the head does not predict are dropped: the head decides what is stated, the text how.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from medexgen_lib.labeler import NEGATIVE, clauses, label_report
from medexgen_lib.report_edits import NEGATION_CUE, align_sides, bank_key, without_negations
from medexgen_lib.sides import split_sentences, stated_observations

TOP_REPORTS = 50
# "The lungs are clear ...": kept beside a lung finding as "The lungs are otherwise clear ...".
_CLEAR = re.compile(r"\b(are|is|appear|remain)\s+(clear)\b", re.IGNORECASE)
# Anatomy a normal sentence speaks of -> the findings that contradict it there.
LUNG_FINDINGS = frozenset({"Lung Opacity", "Lung Lesion", "Consolidation", "Pneumonia", "Edema",
                           "Atelectasis", "Emphysema"})
ANATOMY = (
    (re.compile(r"\b(heart|cardiac|cardio\w*)\b", re.IGNORECASE),
     frozenset({"Cardiomegaly", "Enlarged Cardiomediastinum"})),
    (re.compile(r"\b(lungs?|pulmonary|airspace|parenchym\w*|consolidation|opacit\w*)\b", re.IGNORECASE),
     LUNG_FINDINGS),
    (re.compile(r"\b(pleura\w*|effusions?|pneumothora\w*|costophrenic)\b", re.IGNORECASE),
     frozenset({"Pleural Effusion", "Pneumothorax", "Pleural Other"})),
    (re.compile(r"\b(osseous|bony|bones?|skeletal|ribs?)\b", re.IGNORECASE), frozenset({"Fracture"})),
)


def normal_report(train_texts: Sequence[str], val_texts: Sequence[str], top: int = TOP_REPORTS) -> str:
    """Of the ``top`` most frequent training reports, the one with the best corpus BLEU-4 against
    the val reports (ties: the more frequent)."""
    from medexgen_lib.metrics import corpus_bleu4

    ranked = [text for text, _ in Counter(train_texts).most_common(top)]
    if not ranked:
        raise ValueError("no training reports to choose a normal report from")
    val_texts = list(val_texts)
    if not val_texts:
        return ranked[0]
    return max(ranked, key=lambda text: corpus_bleu4(val_texts, [text] * len(val_texts)))


def contradicted(sentence: str, present: Sequence[str]) -> set[str]:
    """The findings of ``present`` that the normal ``sentence`` contradicts: it negates them, or
    it states no finding and speaks of their anatomy (``ANATOMY``) outside what it negates ("No
    pneumothorax." says nothing against an effusion; "The lungs are clear without ..." does)."""
    labels = label_report(sentence)
    hit = {o for o in present if labels.get(o) == NEGATIVE}
    if not stated_observations(labels):
        # each clause up to its negation cue: "costophrenic angles are sharp without effusion" -> its first half
        rest = " ".join(clause[:cue.start()] if (cue := NEGATION_CUE.search(clause)) else clause
                        for _, clause in clauses(sentence.lower()))
        for words, findings in ANATOMY:
            if words.search(rest):
                hit |= findings & set(present)
    return hit


def plan_report(decoded: str, present: Sequence[str], sides: dict[str, set[str]],
                bank: dict[str, str], normal: str) -> str:
    """The planned report (module docstring) for one study: ``decoded`` the decoder's text,
    ``present`` the head's findings (observation names; side labels and "No Finding" ignored),
    ``sides`` their sides (``postprocess.likely_sides``), ``bank`` the sentence bank, ``normal`` the
    normal report."""
    present = [o for o in present if ", " not in o and o != "No Finding"]
    if not present:
        return normal
    stating: dict[str, tuple[str, set[str]]] = {}  # finding -> (sentence, the findings it states)
    for observation in present:  # the bank's sentence for exactly the finding and the head's sides
        key = bank_key(observation, sides.get(observation, set()))
        if key in bank:
            stating[observation] = (bank[key], {observation})
    for sentence in split_sentences(decoded):
        labels = label_report(sentence)
        stated = stated_observations(labels)
        negates = any(labels.get(o) == NEGATIVE for o in present)
        if stated and stated <= set(present) and not negates and not stated & _covered(stating):
            stating[min(stated, key=present.index)] = (_ended(sentence), stated)
    for observation in present:
        if observation not in _covered(stating):
            sentence = _bank_sentence(observation, sides.get(observation, set()), bank)
            if sentence:
                stating[observation] = (sentence, {observation})
    placed: set[str] = set()
    planned = []
    for sentence in split_sentences(normal):
        hit = contradicted(sentence, present)
        if not hit:
            planned.append(_ended(sentence))
            continue
        for observation in [o for o, (_, stated) in stating.items() if stated & hit]:
            text, stated = stating.pop(observation)
            planned.append(text)
            placed |= stated
        negated = {o for o in hit if label_report(sentence).get(o) == NEGATIVE}
        if negated:
            rest = without_negations(_ended(sentence), negated)
            if rest:
                planned.append(rest)
        elif hit <= LUNG_FINDINGS and hit & placed and _CLEAR.search(sentence):
            planned.append(_ended(_CLEAR.sub(r"\1 otherwise \2", sentence, count=1)))
    at = max(0, len(planned) - 1)
    return " ".join(planned[:at] + [sentence for sentence, _ in stating.values()] + planned[at:])


def _bank_sentence(observation: str, sides: set[str], bank: dict[str, str]) -> str:
    """The bank's sentence for ``observation`` on ``sides``; else the finding's sentence without a
    side; else one naming other sides, its side words set to ``sides`` (``report_edits.align_sides``)
    or left as they are where no side is known. "" where the bank has none for the finding."""
    for key in (bank_key(observation, sides), bank_key(observation)):
        if key in bank:
            return bank[key]
    for key, sentence in bank.items():
        if key.split(" + ")[0] == observation:
            return align_sides(sentence, {observation: sides}) if sides else sentence
    return ""


def _covered(stating: dict[str, tuple[str, set[str]]]) -> set[str]:
    return set().union(*(stated for _, stated in stating.values()))


def _ended(sentence: str) -> str:
    return sentence if sentence[-1] in ".;!?" else sentence + "."
