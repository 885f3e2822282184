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

What is done with the head's findings after decoding (side words, stated findings, planning)
is the post-processing step's (``medexgen_lib.postprocess``), not the model's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from medexgen_lib.labeler import OBSERVATIONS, POSITIVE, label_report
from medexgen_lib.sides import SIDED_OBSERVATIONS, SIDES, report_sides, side_label


def label_words(label: str) -> str:
    """The words a label's guidance token carries: ``"Pleural Effusion, left"`` -> ``"left pleural
    effusion"``, ``"Cardiomegaly"`` -> ``"cardiomegaly"``."""
    observation, _, side = label.partition(", ")
    return f"{side} {observation}".strip().lower()


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

