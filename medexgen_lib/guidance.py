"""Clinical guidance: an observation head on pooled image features, and guidance tokens for the decoder.

Labels come from the training reports themselves: ``label_report`` of each report
(positive vs not) plus, for the sided observations, which side(s) the report's
sentences name ("left", "right", "bilateral"). Nothing beyond the report text is used.

The head sees each view's feature map average-pooled to a ``pool x pool`` grid
(2x2 keeps the image's left and right halves apart, which laterality needs) and
predicts every label (multi-label, BCE). Its predictions reach the decoder as one
label-state vector per label, ``p * present[label] + (1 - p) * absent[label]``:
with ``guidance.embedding`` their mean is added to every input token embedding
(each decoding step sees it directly), with ``guidance.decoder`` they are appended
to the visual tokens for cross-attention (PromptMRG-style guidance, as embeddings
rather than prompt text).

What the decoder sees at training time (``guidance.decoder_input``):
``true`` (the demo's choice): the labels of the report being learned, so the decoder
learns a clean labels -> text mapping from the first step instead of ignoring a head
that is still guessing; at test time it is given the head's predictions thresholded
at 0.5 (``guidance_hard``), the same 0/1 kind of input. ``predicted``: the head's
detached probabilities at training and test time (no train/test mismatch, but early
in training the guidance is noise and the decoder learns to rely on its language
prior). Single-seed phantom runs (64 px, 12 epochs of batch 8, test split; macro-F1 /
BLEU-4 / laterality): tokens + embedding with ``predicted`` .65/.33/.55, with ``true``
.80/.37/.46; embedding only with ``true`` .78/.38/.68 (the demo default).
The head learns only
from its BCE (the decoder's loss does not reach it through the guidance).
"""

from __future__ import annotations

import re
from pathlib import Path
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from medexgen_lib.labeler import OBSERVATIONS, POSITIVE, UNCERTAIN, label_report

SIDED_OBSERVATIONS = ("Pleural Effusion", "Pneumothorax", "Lung Lesion", "Consolidation")
SIDES = ("left", "right")
_SENTENCE_SPLIT = re.compile(r"(?<!\d)[.;](?!\d)|\n")
_SIDE_WORDS = {"left": re.compile(r"\bleft\b"), "right": re.compile(r"\bright\b"),
               "bilateral": re.compile(r"\bbilateral(ly)?\b|\bboth\b")}


def side_label(observation: str, side: str) -> str:
    """The label name for ``observation`` on ``side`` (e.g. ``"Pleural Effusion, left"``)."""
    return f"{observation}, {side}"


def report_sides(text: str) -> dict[str, set[str]]:
    """Sided observations the report states (positive or uncertain) -> the sides named in the
    same sentence ({"left"}, {"right"}, both for "bilateral"; empty when no side is named)."""
    sides: dict[str, set[str]] = {}
    for sentence in _SENTENCE_SPLIT.split(text or ""):
        if not sentence.strip():
            continue
        labels = label_report(sentence)
        named = {s for s in SIDES if _SIDE_WORDS[s].search(sentence.lower())}
        if _SIDE_WORDS["bilateral"].search(sentence.lower()):
            named |= set(SIDES)
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

    def logits(self, features: torch.Tensor, batch: int, view_mask: torch.Tensor) -> torch.Tensor:
        """Encoder maps ``[B*V, C, h, w]`` -> label logits ``[B, L]`` (blank views zeroed)."""
        pooled = self.pool(features).flatten(1).reshape(batch, view_mask.shape[1], -1)
        pooled = pooled * view_mask.unsqueeze(-1).to(pooled.dtype)
        return self.head(pooled.flatten(1))

    def tokens(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Label probabilities ``[B, L]`` -> guidance tokens ``[B, L, n_embd]``."""
        p = probabilities.unsqueeze(-1).to(self.states.dtype)
        return p * self.states[1] + (1 - p) * self.states[0]


def observation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE of the head, averaged over labels and studies."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float())


class LossHook:
    """What training adds to a batch for guidance: the observation head's targets (the labels
    of the batch's reports) and, with ``guidance.decoder_input = "true"``, the same labels as
    the decoder's guidance; ``weight`` is ``guidance.loss_weight`` of the head's BCE."""

    def __init__(self, cfg, train_data, labels: Sequence[str]):
        self.weight = cfg.guidance.loss_weight
        self.teacher = ((cfg.guidance.decoder or cfg.guidance.embedding)
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
