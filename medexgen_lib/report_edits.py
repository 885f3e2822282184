"""Edits of a report's text from the observation head's findings (applied by ``postprocess``):
side words set to the head's sides (``align_sides``), findings the text leaves out stated from a
sentence bank of the training reports (``sentence_bank``, ``state_findings``), and what would
contradict them taken out (``without_negations``, ``normal_sentences``)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence

from medexgen_lib.labeler import ABSENT, NEGATIVE, POSITIVE, UNCERTAIN, clauses, label_report
from medexgen_lib.sides import (SENTENCE_PIECES, SIDE_WORD, SIDE_WORD_ANY_CASE, SIDED_OBSERVATIONS, SIDES,
                                report_sides,
                                side_label, split_sentences, stated_observations)

# Clause ends inside a sentence: commas, "and", "but", "with" (not "consistent with"), ...
_CLAUSE_END = re.compile(r",|\b(?:and|but|however|although|while|whereas|which)\b|(?<!consistent )\bwith\b",
                         re.IGNORECASE)


def _clause_around(sentence: str, start: int) -> str:
    """The clause of ``sentence`` that holds the character at ``start``."""
    ends = list(_CLAUSE_END.finditer(sentence))
    begin = max([m.end() for m in ends if m.end() <= start], default=0)
    stop = min([m.start() for m in ends if m.start() >= start], default=len(sentence))
    return sentence[begin:stop]


def _in_case_of(word: str, like: str) -> str:
    """``word`` in the letter case of ``like`` (LEFT, Left or left)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[0].isupper() else word


def align_sides(text: str, sides: dict[str, set[str]]) -> str:
    """``text`` with the side word of each sentence that states exactly one sided observation
    (positive or uncertain) set to that observation's side in ``sides`` (``likely_sides``).
    Only where the sentence names exactly one side ("left", "right" or "bilateral") and that
    word's clause states the observation itself ("small right pleural effusion", "consolidation
    in the right lower lobe", not "no pneumothorax on the right" nor "right base atelectasis
    with pleural effusion"); "bilateral" is written only in front of a finding, not after
    "the". Everything else is kept byte for byte: the decoder chooses what to say, the head where."""
    pieces = SENTENCE_PIECES.split(text)
    for at in range(0, len(pieces), 2):  # even pieces are sentences, odd ones their ends
        sentence = pieces[at]
        named = list(SIDE_WORD_ANY_CASE.finditer(sentence))
        if len(named) != 1 or named[0].group(1).lower() not in ("left", "right", "bilateral"):
            continue
        labels = label_report(sentence)
        stated = [o for o in SIDED_OBSERVATIONS if labels.get(o) in (POSITIVE, UNCERTAIN)]
        if len(stated) != 1 or not sides.get(stated[0]):
            continue
        clause = label_report(_clause_around(sentence, named[0].start()))
        if clause.get(stated[0]) not in (POSITIVE, UNCERTAIN):
            continue
        word = "bilateral" if set(sides[stated[0]]) == set(SIDES) else next(iter(sides[stated[0]]))
        if word == "bilateral" and re.search(r"\bthe\s+$", sentence[:named[0].start()], re.IGNORECASE):
            continue  # "in the left lower lobe" cannot become "in the bilateral lower lobe"
        word = _in_case_of(word, named[0].group(1))
        pieces[at] = sentence[:named[0].start()] + word + sentence[named[0].end():]
    return "".join(pieces)


def bank_key(observation: str, sides: set[str] | frozenset[str] = frozenset()) -> str:
    """``sentence_bank``'s key for ``observation`` stated on ``sides``: its head labels joined by
    " + " ("Pleural Effusion + Pleural Effusion, left"; the finding alone where no side is named)."""
    return " + ".join([observation] + [side_label(observation, s) for s in SIDES if s in sides])


def bank_keys(labels: Sequence[str]) -> set[str]:
    """Every ``bank_key`` that ``labels`` (a model's guidance labels) can express."""
    keys, known = set(), set(labels)
    for observation in labels:
        if ", " not in observation:
            named = [s for s in SIDES if side_label(observation, s) in known]
            keys |= {bank_key(observation, set(sides)) for sides in ([], *([s] for s in named), named)}
    return keys


def bank_sentence_key(sentence: str, labels: Collection[str]) -> str | None:
    """The ``bank_key`` under which ``sentence`` may stand in a sentence bank for ``labels``: one
    sentence, with its end, that states one observation of ``labels``, positive, and mentions no other
    (so it negates nothing); its key names the sides it names that ``labels`` has. None otherwise."""
    if not sentence.strip() or split_sentences(sentence) != [sentence.strip()] or sentence.strip()[-1] not in ".;!?":
        return None
    found = label_report(sentence)
    mentioned = [o for o, v in found.items() if v != ABSENT and o != "No Finding"]
    if len(mentioned) != 1 or found[mentioned[0]] != POSITIVE or mentioned[0] not in labels:
        return None
    observation = mentioned[0]
    sides = {s for s in report_sides(sentence).get(observation, set()) if side_label(observation, s) in labels}
    return bank_key(observation, sides)


# Bank sentences stand in a report about this study alone: none that compares with a prior study,
# measures, hides words behind Open-i's de-identification mark, or also calls something clear or
# normal (a dictation slip such as "Lungs are expanded and clear airspace disease." labels positive).
_NOT_FOR_BANK = re.compile(r"\d|XXXX|\b(?:unchanged|stable|again|prior|previous(?:ly)?|interval|compared|"
                           r"comparison|increased|decreased|improved|worsened|redemonstrat\w*|persist\w*|"
                           r"new|known|since|change|clear|normal)\b", re.IGNORECASE)


# Sites that imply a side (as in ``realtext``'s mapping: lingula and retrocardiac left, middle lobe
# right): a sentence naming one is not side-free, so a finding without a sided sentence does not
# get it on the wrong side.
_SITE_WITH_SIDE = re.compile(r"\b(?:lingula\w*|retrocardiac|middle\s+lobe)\b", re.IGNORECASE)


# The sentence bank compares at most this many distinct candidates per finding with at most this
# many distinct sentences (the most frequent; counts weigh them), so it stays quick on large corpora.
BANK_CANDIDATES, BANK_COMPARED = 100, 500


def sentence_bank(texts: Sequence[str], labels: Sequence[str]) -> dict[str, str]:
    """Per finding of ``labels`` and the sides named with it (``bank_key``), the most typical
    sentence of ``texts`` (the training reports) that states it (``bank_sentence_key``): the one
    whose words agree most with the other sentences stating it (``typical_sentence``), so a wording
    radiologists repeat wins over a one-off. A key that names no side takes a sentence that names
    none, nor a site that implies one (lingula, retrocardiac, middle lobe), where one exists.
    Sentences that compare with a prior study, give a measurement or hold a de-identified word
    (``_NOT_FOR_BANK``) are left out."""
    occurrences = Counter(sentence for text in texts for sentence in split_sentences(text))
    counts: dict[str, Counter] = {}
    for sentence, n in occurrences.items():  # each distinct sentence labelled once, in the order first seen
        if _NOT_FOR_BANK.search(sentence):
            continue
        key = bank_sentence_key(sentence, labels)
        if key is not None:
            counts.setdefault(key, Counter())[sentence] += n
    bank: dict[str, str] = {}
    for key, seen in counts.items():
        sideless = Counter({s: n for s, n in seen.items()
                            if not SIDE_WORD.search(s.lower()) and not _SITE_WITH_SIDE.search(s)})
        bank[key] = typical_sentence(seen, sideless if " + " not in key and sideless else seen)
    return bank


def typical_sentence(seen: Counter, candidates: Counter) -> str:
    """Of ``candidates``, the sentence with the highest mean word agreement (LCS F1 of lowercased
    words) with the sentences of ``seen`` (a Counter: each occurrence counts; the candidate's own
    occurrence once less). Ties: the shorter, then the one seen first."""
    words = {s: _words(s) for s in seen}
    compared = seen.most_common(BANK_COMPARED)
    total = sum(n for _, n in compared)

    def agreement(sentence: str) -> float:
        alike = sum(n * _lcs_f1(words[sentence], words[other]) for other, n in compared)
        own = 1.0 if sentence in dict(compared) else 0.0
        return (alike - own) / max(1, total - own)

    ranked = [s for s, _ in candidates.most_common(BANK_CANDIDATES)]
    return max(ranked, key=lambda s: (agreement(s), -len(words[s]), -list(seen).index(s)))


def _words(sentence: str) -> list[str]:
    return re.findall(r"[a-z]+", sentence.lower())


def _lcs_f1(a: list[str], b: list[str]) -> float:
    """F1 of the longest common subsequence of word lists ``a`` and ``b`` (ROUGE-L's, beta 1).
    Bit-parallel (Hyyrö's): one integer operation per word of ``a``, not one per pair of words."""
    masks: dict[str, int] = {}
    for at, word in enumerate(b):
        masks[word] = masks.get(word, 0) | 1 << at
    full = (1 << len(b)) - 1
    row = full
    for word in a:
        match = row & masks.get(word, 0)
        row = ((row + match) | (row - match)) & full
    common = len(b) - bin(row).count("1")
    return 2 * common / (len(a) + len(b)) if common else 0.0


def normal_sentences(texts: Sequence[str], min_count: int = 2) -> list[str]:
    """Sentences of ``texts`` (the training reports) that only reports stating no finding
    contain, in at least ``min_count`` of them, and that mention no observation themselves
    ("The lungs are clear.", "Normal chest."): a report that states a finding drops them
    (``state_findings``). Most frequent first, ties in the order first seen."""
    normal: Counter = Counter()
    with_finding: set[str] = set()
    for text in texts:
        sentences = list(dict.fromkeys(split_sentences(text)))  # once each, in order: ties keep first seen
        if stated_observations(label_report(text)):
            with_finding.update(sentences)
        else:
            normal.update(s for s in sentences
                          if all(v == ABSENT for o, v in label_report(s).items() if o != "No Finding"))
    return [s for s, n in normal.most_common() if n >= min_count and s not in with_finding]


# Negation cues that open a negated list ("no effusion or pneumothorax", "without consolidation"),
# the separators of its items, and connectors left at the edge of a sentence once a clause goes.
NEGATION_CUE = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of|nor|neither)\b",
                           re.IGNORECASE)
_LIST_ITEMS = re.compile(r"\s*,\s*(?:(?:and|or|nor)\s+)?|\s+(?:and|or|nor)\s+", re.IGNORECASE)
_LIST_WORD = re.compile(r"\b(and|or|nor)\b", re.IGNORECASE)
_LEADING_CONNECTOR = re.compile(r"^[\s,;:]*(?:(?:and|but|with|however|although|though|whereas)\b[\s,]*)?",
                                re.IGNORECASE)
_TRAILING_CONNECTOR = re.compile(r"(?:[\s,;:]+(?:and|but|with|or)?)+$", re.IGNORECASE)


def _mentioned(text: str) -> set[str]:
    """The observations ``text`` mentions in any way (positive, uncertain or negated)."""
    return {o for o, v in label_report(text).items() if v != ABSENT and o != "No Finding"}


def _clause_without(clause: str, negated: set[str]) -> str:
    """``clause`` without its statement that the ``negated`` observations are absent: the items of
    its negated list that mention them go ("no effusion or pneumothorax" -> "no effusion"); where
    none is left, the cue goes too, and the clause with it unless what comes before the cue states
    a finding ("small left pleural effusion without pneumothorax" -> "small left pleural effusion").
    A negation after its mention ("pneumothorax is not seen") takes the whole clause."""
    for cue in reversed(list(NEGATION_CUE.finditer(clause))):
        tail = clause[cue.end():]
        if _mentioned(tail) & negated:
            break
    else:
        return ""
    core = tail.rstrip(" ,;:")
    trailing = tail[len(core):]  # the clause's separator from what follows ("..., but ...") stays
    items = [item.strip() for item in _LIST_ITEMS.split(core.strip()) if item.strip()]
    kept = [item for item in items if not _mentioned(item) & negated]
    if kept:
        word = (_LIST_WORD.findall(core) or ["or"])[-1]
        listed = kept[0] if len(kept) == 1 else ", ".join(kept[:-1]) + f" {word} " + kept[-1]
        return f"{clause[:cue.end()]} {listed}{trailing}"
    head = clause[:cue.start()]
    return head.rstrip() + trailing if stated_observations(label_report(head)) else trailing


def without_negations(sentence: str, observations: set[str]) -> str:
    """``sentence`` (one, with its end) without what says that any of ``observations`` is absent
    (``_clause_without`` per clause, the labeler's scopes); the rest of the sentence is kept, or
    "" where nothing is left. A sentence that negates none of them is returned as it was."""
    body = sentence.rstrip(".;!? ")
    negated = {o for o in observations if label_report(body).get(o) == NEGATIVE}
    if not negated:
        return sentence
    if len(body.lower()) != len(body):  # clause offsets would not fit the text: the sentence goes
        return ""
    pieces, at = [], 0
    for offset, clause in clauses(body.lower()):
        original = body[offset:offset + len(clause)]
        pieces.append(body[at:offset])
        negates = any(label_report(original).get(o) == NEGATIVE for o in negated)
        pieces.append(_clause_without(original, negated) if negates else original)
        at = offset + len(clause)
    text = re.sub(r"\s+([,;:])", r"\1", re.sub(r"\s{2,}", " ", "".join(pieces) + body[at:]))
    text = _TRAILING_CONNECTOR.sub("", _LEADING_CONNECTOR.sub("", text)).strip()
    if not re.search(r"[a-z]", text, re.IGNORECASE):
        return ""
    if body[0].isupper():
        text = text[0].upper() + text[1:]
    return text + (sentence[len(body):].strip() or ".")


def state_findings(text: str, present: Sequence[str], sides: dict[str, set[str]],
                   bank: dict[str, str], normal: Sequence[str] = ()) -> str:
    """``text`` where each observation in ``present`` (the head's findings) that it does not state
    is stated: ``bank``'s sentence for the finding on its ``sides`` (``likely_sides``; the finding
    alone where the bank has no sentence for those sides) goes in after the last sentence that
    states a finding. What would contradict it goes: the statement that an added finding is
    absent (``without_negations``: "No pleural effusion or pneumothorax." with a pneumothorax
    added keeps "No pleural effusion."; a sentence left with nothing goes), and ``normal``
    sentences (``normal_sentences``, matched with or without their final period). A kept
    sentence without an end gets a period. Text with nothing to add is returned as it was; a
    finding the bank lacks is left out."""
    stated = stated_observations(label_report(text))
    added = {}
    for observation in present:
        if ", " in observation or observation == "No Finding" or observation in stated:
            continue
        for key in (bank_key(observation, sides.get(observation, set())), bank_key(observation)):
            if key in bank:
                added[observation] = bank[key]
                break
    if not added:
        return text
    normal = set(normal)
    kept = []
    for sentence in split_sentences(text):
        sentence = sentence if sentence[-1] in ".;!?" else sentence + "."
        if sentence not in normal and (sentence := without_negations(sentence, set(added))):
            kept.append(sentence)
    at = max([i + 1 for i, s in enumerate(kept) if stated_observations(label_report(s))], default=0)
    return " ".join(kept[:at] + list(added.values()) + kept[at:])
