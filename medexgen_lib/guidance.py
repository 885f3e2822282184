"""Clinical guidance: an observation head on pooled image features, and guidance for the decoder.

Labels come from the training reports themselves: ``label_report`` of each report
(positive vs not) plus, for the sided observations, which side(s) the report's
sentences name ("left", "right", "bilateral"). Nothing beyond the report text is used.

The head sees each view's feature map average-pooled to a ``pool x pool`` grid
(2x2 keeps the image's left and right halves apart, which laterality needs) and
predicts every label (multi-label, BCE). Its predictions reach the decoder as one
label-state vector per label, ``p * present[label] + (1 - p) * absent[label]``:

* ``guidance.prompt`` (the demo's choice): the decoder's input starts with one such token
  per label, a present label's token also carrying its words in the decoder's own token
  embedding ("left pleural effusion"), PromptMRG-style. A sided finding is announced by its
  side label's token (its own token then says "present, no side named"), so the decoder
  learns what to write and on which side from one token;
* ``guidance.embedding``: the tokens' mean added to every input token embedding;
* ``guidance.decoder``: the tokens appended to the visual tokens for cross-attention.

What the decoder sees at training time (``guidance.decoder_input``): ``true`` (the demo's
choice): the labels of the report being learned, so the decoder learns a clean labels ->
text mapping from the first step instead of ignoring a head that is still guessing; at test
time it gets the head's predictions as the same 0/1 kind of input (``hard_labels``): an
observation at its threshold, chosen on val for the exported checkpoint
(``choose_thresholds``), a side where it is more likely than not given the finding.
``predicted``: the head's detached probabilities at training and test time (no train/test
mismatch, but early in training the guidance is noise and the decoder learns to rely on its
language prior). The head learns only from its BCE (the decoder's loss does not reach it
through the guidance).

``guidance.align_sides`` (the demo's choice): the decoder follows the prompt's findings but
not reliably their sides (it writes a finding twice with both sides, or the side it saw
with similar training images), while the head's side labels are mostly right. So in each
generated sentence that states one sided finding and names one side, the side word
becomes the head's (``align_sides``): the decoder chooses what to say, the head where.
Measured lever by lever in ``medexgen_lib.ablation`` (README).
"""

from __future__ import annotations

import re
from pathlib import Path
from collections import Counter
from collections.abc import Collection, Sequence

import torch
from torch import nn

from medexgen_lib.labeler import ABSENT, NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, clauses, label_report

SIDED_OBSERVATIONS = ("Pleural Effusion", "Pneumothorax", "Lung Lesion", "Consolidation")
SIDES = ("left", "right")
# Sentence ends (kept by split: even pieces are sentences, odd ones their ends) and side words
# ("bilateral", "bilaterally" and "both" name both sides).
_SENTENCE_PIECES = re.compile(r"((?<!\d)[.;!?](?!\d)|\n)")
_SIDE_WORD = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b")  # in lowercased text
_SIDE_WORD_ANY_CASE = re.compile(_SIDE_WORD.pattern, re.IGNORECASE)  # where the text keeps its case


def label_words(label: str) -> str:
    """The words a label's guidance token carries: ``"Pleural Effusion, left"`` -> ``"left pleural
    effusion"``, ``"Cardiomegaly"`` -> ``"cardiomegaly"``."""
    observation, _, side = label.partition(", ")
    return f"{side} {observation}".strip().lower()


def side_label(observation: str, side: str) -> str:
    """The label name for ``observation`` on ``side`` (e.g. ``"Pleural Effusion, left"``)."""
    return f"{observation}, {side}"


def report_sides(text: str) -> dict[str, set[str]]:
    """Sided observations the report states (positive or uncertain) -> the sides named in the
    same sentence ({"left"}, {"right"}, both for "bilateral"; empty when no side is named)."""
    sides: dict[str, set[str]] = {}
    for sentence in _SENTENCE_PIECES.split(text or "")[::2]:
        if not sentence.strip():
            continue
        labels = label_report(sentence)
        words = set(_SIDE_WORD.findall(sentence.lower()))
        named = set(SIDES) if words - set(SIDES) else words
        for observation in SIDED_OBSERVATIONS:
            if labels.get(observation) in (POSITIVE, UNCERTAIN):
                sides.setdefault(observation, set()).update(named)
    return sides


def report_targets(text: str, labels: Sequence[str]) -> list[float]:
    """0/1 per label for one report: observation labels are the labeler's positives,
    side labels (``side_label``) the sides named for a positive sided observation."""
    positives = {o for o, v in label_report(text).items() if v == POSITIVE}
    for observation, sides in report_sides(text).items():
        if observation in positives:
            positives |= {side_label(observation, s) for s in sides}
    return [1.0 if label in positives else 0.0 for label in labels]


def choose_labels(texts: Sequence[str], min_count: int) -> list[str]:
    """The labels to predict: observations positive in at least ``min_count`` training reports
    (in ``label_report``'s order), then both side labels of each kept sided observation."""
    counts = Counter(o for text in texts for o, v in label_report(text).items() if v == POSITIVE)
    kept = [o for o in OBSERVATIONS if counts[o] >= min_count]
    return kept + [side_label(o, s) for o in SIDED_OBSERVATIONS if o in kept for s in SIDES]


class TargetLookup:
    """Training-report targets by study uid, computed once per run (labeling is not free)."""

    def __init__(self, examples: Sequence, labels: Sequence[str]):
        self.targets = {e.uid: report_targets(e.text, labels) for e in examples}

    def __call__(self, uids: Sequence[str], device: torch.device | str) -> torch.Tensor:
        return torch.tensor([self.targets[u] for u in uids], dtype=torch.float32, device=device)


class ObservationGuidance(nn.Module):
    """Observation head (pooled features of every view -> one logit per label) and, with
    ``feed_decoder``, the label-state embeddings that turn probabilities into decoder tokens."""

    def __init__(self, labels: Sequence[str], encoder_dim: int, n_views: int, n_embd: int,
                 pool: int, feed_decoder: bool):
        super().__init__()
        self.labels = list(labels)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Linear(n_views * pool * pool * encoder_dim, len(self.labels))
        self.states = (nn.Parameter(torch.randn(2, len(self.labels), n_embd) * 0.02)
                       if feed_decoder else None)
        self.side_groups: dict[int, list[int]] = {}  # a sided observation's index -> its side labels'
        for index, label in enumerate(self.labels):
            if ", " in label:
                self.side_groups.setdefault(self.labels.index(label.split(", ")[0]), []).append(index)

    def logits(self, features: torch.Tensor, batch: int, view_mask: torch.Tensor) -> torch.Tensor:
        """Encoder maps ``[B*V, C, h, w]`` -> label logits ``[B, L]`` (blank views zeroed)."""
        pooled = self.pool(features).flatten(1).reshape(batch, view_mask.shape[1], -1)
        pooled = pooled * view_mask.unsqueeze(-1).to(pooled.dtype)
        return self.head(pooled.flatten(1))

    def tokens(self, probabilities: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """Label probabilities ``[B, L]`` -> guidance tokens ``[B, L, n_embd]``; ``words``
        ``[L, n_embd]`` (each label's words in the decoder's own token embedding) are added
        to a present label's token."""
        p = probabilities.unsqueeze(-1).to(self.states.dtype)
        tokens = p * self.states[1] + (1 - p) * self.states[0]
        return tokens if words is None else tokens + p * words.to(tokens.dtype)

    def prompt_tokens(self, probabilities: torch.Tensor, words: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The decoder's prompt ``[B, L, n_embd]``: a sided observation's own token stands for
        "present, no side named" (its probability times that of no side), so where a side is
        known only the side label's token says the finding is there: the decoder learns what
        to write and on which side from the same token."""
        p = probabilities.clone()
        for label, sides in self.side_groups.items():
            p[:, label] = probabilities[:, label] * (1 - probabilities[:, sides]).prod(-1)
        return self.tokens(p, words)


THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.1 .. 0.9


# The threshold of a label the head does not tell apart on val: never reached by a probability.
LABEL_OFF = 1.0


def auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the 0/1 ``truth`` (ties count half); NaN
    where either class is missing."""
    positive, negative = scores[truth.bool()], scores[~truth.bool()]
    if not len(positive) or not len(negative):
        return float("nan")
    above = (positive[:, None] > negative[None, :]).double().mean()
    tied = (positive[:, None] == negative[None, :]).double().mean()
    return float(above + 0.5 * tied)


def choose_thresholds(probabilities: torch.Tensor, targets: torch.Tensor, labels: Sequence[str],
                      min_auroc: float = 0.0) -> list[float]:
    """Per observation label, the threshold of ``THRESHOLD_GRID`` with the best F1 on these
    (validation) studies, F1 averaged with the two neighbouring thresholds so that one lucky
    study does not decide; ties, and labels with no positive study, keep the one nearest 0.5.
    Side labels keep 0.5: their sides are decided given the finding (``hard_labels``).
    A finding whose val AUROC is below ``min_auroc`` is switched off (``LABEL_OFF``): where the
    head cannot tell its studies apart, the best F1 is had by calling every study positive,
    which states the finding in every report."""
    def f1(column: int, threshold: float) -> float:
        predicted, truth = probabilities[:, column] > threshold, targets[:, column].bool()
        return 2 * int((predicted & truth).sum()) / max(1, int(predicted.sum()) + int(truth.sum()))

    chosen = []
    for column, label in enumerate(labels):
        if ", " in label or not targets[:, column].any():
            chosen.append(0.5)
            continue
        if label != "No Finding" and auroc(probabilities[:, column], targets[:, column]) < min_auroc:
            chosen.append(LABEL_OFF)
            continue
        smoothed = {t: (f1(column, t - 0.05) + f1(column, t) + f1(column, t + 0.05)) / 3 for t in THRESHOLD_GRID}
        chosen.append(max(THRESHOLD_GRID, key=lambda t: (round(smoothed[t], 9), -abs(t - 0.5))))
    return chosen


def hard_labels(probabilities: torch.Tensor, thresholds: Sequence[float], labels: Sequence[str]
                ) -> torch.Tensor:
    """0/1 labels from the head's probabilities: an observation at its threshold; a side of a
    present finding where that side is more likely than not given the finding (side
    probability / finding probability > 0.5), so a finding whose side is uncertain is still
    reported, with the likelier side where the training reports name one."""
    hard = (probabilities > torch.tensor(thresholds, device=probabilities.device)).to(probabilities.dtype)
    for index, label in enumerate(labels):
        if ", " in label:
            parent = labels.index(label.split(", ")[0])
            given = probabilities[:, index] / probabilities[:, parent].clamp_min(1e-6)
            hard[:, index] = hard[:, parent] * (given > 0.5).to(hard.dtype)
    return hard


def likely_sides(probabilities: torch.Tensor, labels: Sequence[str], hard: torch.Tensor
                 ) -> list[dict[str, set[str]]]:
    """Per study, each sided observation present in ``hard`` (``hard_labels``' 0/1 labels) -> its
    sides there, or where none is and the observation has both side labels, the likelier one
    by ``probabilities``: a report that states the finding names its side (the phantom's
    convention). An absent finding, or one whose side probabilities are not numbers, gets none."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for index, label in enumerate(labels):
        if ", " in label:
            observation, side = label.split(", ")
            groups.setdefault(observation, []).append((side, index))
    out: list[dict[str, set[str]]] = [{} for _ in range(probabilities.shape[0])]
    for observation, sides in groups.items():
        column = labels.index(observation)
        for study in range(probabilities.shape[0]):
            row = [float(probabilities[study, index]) for _, index in sides]
            if not hard[study, column] or any(p != p for p in row):  # absent, or NaN
                continue
            named = {side for side, index in sides if hard[study, index]}
            if not named and {side for side, _ in sides} == set(SIDES):
                named = {sides[row.index(max(row))][0]}
            if named:
                out[study][observation] = named
    return out


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
    pieces = _SENTENCE_PIECES.split(text)
    for at in range(0, len(pieces), 2):  # even pieces are sentences, odd ones their ends
        sentence = pieces[at]
        named = list(_SIDE_WORD_ANY_CASE.finditer(sentence))
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


def _sentences(text: str) -> list[str]:
    """``text``'s sentences, each with its end (``_SENTENCE_PIECES``: not "1." nor "2.5")."""
    pieces = _SENTENCE_PIECES.split(text or "") + [""]
    return [(pieces[at] + pieces[at + 1]).strip() for at in range(0, len(pieces) - 1, 2)
            if pieces[at].strip()]


def _stated(labels: dict[str, str]) -> set[str]:
    """The observations ``label_report``'s ``labels`` state (positive or uncertain), "No Finding" aside."""
    return {o for o, v in labels.items() if v in (POSITIVE, UNCERTAIN) and o != "No Finding"}


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
    if not sentence.strip() or _sentences(sentence) != [sentence.strip()] or sentence.strip()[-1] not in ".;!?":
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


# The sentence bank compares at most this many distinct candidates per finding with at most this
# many distinct sentences (the most frequent; counts weigh them), so it stays quick on large corpora.
BANK_CANDIDATES, BANK_COMPARED = 100, 500


def sentence_bank(texts: Sequence[str], labels: Sequence[str]) -> dict[str, str]:
    """Per finding of ``labels`` and the sides named with it (``bank_key``), the most typical
    sentence of ``texts`` (the training reports) that states it (``bank_sentence_key``): the one
    whose words agree most with the other sentences stating it (``typical_sentence``), so a wording
    radiologists repeat wins over a one-off. A key that names no side takes a sentence that names
    none where one exists. Sentences that compare with a prior study, give a measurement or hold a
    de-identified word (``_NOT_FOR_BANK``) are left out."""
    counts: dict[str, Counter] = {}
    for text in texts:
        for sentence in _sentences(text):
            if _NOT_FOR_BANK.search(sentence):
                continue
            key = bank_sentence_key(sentence, labels)
            if key is not None:
                counts.setdefault(key, Counter())[sentence] += 1
    bank: dict[str, str] = {}
    for key, seen in counts.items():
        sideless = Counter({s: n for s, n in seen.items() if not _SIDE_WORD.search(s.lower())})
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
    """F1 of the longest common subsequence of word lists ``a`` and ``b`` (ROUGE-L's, beta 1)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    return 2 * common / (len(a) + len(b)) if common else 0.0


def normal_sentences(texts: Sequence[str], min_count: int = 2) -> list[str]:
    """Sentences of ``texts`` (the training reports) that only reports stating no finding
    contain, in at least ``min_count`` of them, and that mention no observation themselves
    ("The lungs are clear.", "Normal chest."): a report that states a finding drops them
    (``state_findings``). Most frequent first, ties in the order first seen."""
    normal: Counter = Counter()
    with_finding: set[str] = set()
    for text in texts:
        sentences = list(dict.fromkeys(_sentences(text)))  # once each, in order: ties keep first seen
        if _stated(label_report(text)):
            with_finding.update(sentences)
        else:
            normal.update(s for s in sentences
                          if all(v == ABSENT for o, v in label_report(s).items() if o != "No Finding"))
    return [s for s, n in normal.most_common() if n >= min_count and s not in with_finding]


# Negation cues that open a negated list ("no effusion or pneumothorax", "without consolidation"),
# the separators of its items, and connectors left at the edge of a sentence once a clause goes.
_NEGATION_CUE = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of|nor|neither)\b",
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
    for cue in reversed(list(_NEGATION_CUE.finditer(clause))):
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
    return head.rstrip() + trailing if _stated(label_report(head)) else trailing


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
    stated = _stated(label_report(text))
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
    for sentence in _sentences(text):
        sentence = sentence if sentence[-1] in ".;!?" else sentence + "."
        if sentence not in normal and (sentence := without_negations(sentence, set(added))):
            kept.append(sentence)
    at = max([i + 1 for i, s in enumerate(kept) if _stated(label_report(s))], default=0)
    return " ".join(kept[:at] + list(added.values()) + kept[at:])


def observation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE of the head, averaged over labels and studies."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float())


class LossHook:
    """What training adds to a batch for guidance: the observation head's targets (the labels
    of the batch's reports) and, with ``guidance.decoder_input = "true"``, the same labels as
    the decoder's guidance; ``weight`` is ``guidance.loss_weight`` of the head's BCE."""

    def __init__(self, cfg, train_data, labels: Sequence[str]):
        self.weight = cfg.guidance.loss_weight
        self.teacher = ((cfg.guidance.decoder or cfg.guidance.embedding or cfg.guidance.prompt)
                        and cfg.guidance.decoder_input == "true")
        self.lookup = TargetLookup(train_data.examples, labels) if labels else None

    def inputs(self, batch: dict, device: torch.device | str) -> dict:
        """Keyword arguments for the model's forward beyond images, ids and masks."""
        if self.lookup is None:
            return {}
        targets = self.lookup(batch["uids"], device)
        return {"observation_targets": targets, **({"teacher_labels": targets} if self.teacher else {})}


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
    import json

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
