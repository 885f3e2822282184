"""Post-processing: the visible step between the decoder's text and the report a user gets.

``ReportGenerator`` encodes images and decodes text; the edits made with its observation head's
findings happen here, named, in this order, and each reports what it changed:

* ``align_sides`` (``guidance.align_sides``, the demo's choice): the decoder follows the prompt's
  findings but not reliably their sides (it writes a finding twice with both sides, or the side
  it saw with similar training images), while the head's side labels are mostly right. So in
  each generated sentence that states one sided finding and names one side, the side word
  becomes the head's (``report_edits.align_sides``): the decoder chooses what to say, the head where;
* ``state_findings`` (``guidance.state_findings``): each finding the head predicts that the text
  does not state goes in from the sentence bank (``report_edits.state_findings``);
* ``plan_report`` (``guidance.plan_reports``, instead of ``state_findings``): the report is
  planned around the normal report (``planning.plan_report``).

Measured lever by lever in ``medexgen_lib.ablation`` (docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from medexgen_lib import planning, report_edits
from medexgen_lib.guidance import hard_labels
from medexgen_lib.sides import SIDES

if TYPE_CHECKING:
    from medexgen_lib.model import ReportGeneratorConfig

STEPS = ("align_sides", "state_findings", "plan_report")


@dataclass
class PostProcessed:
    """The edited reports, and per report the names of the steps (``STEPS``) that changed its text."""

    texts: list[str]
    changed_by: list[list[str]]


def post_process(texts: Sequence[str], probabilities: torch.Tensor | None, config: ReportGeneratorConfig
                 ) -> PostProcessed:
    """The reports made of the decoder's ``texts`` with the head's ``probabilities`` (``[B, L]``, the
    sigmoid of its logits; None for a model without a head) as the model's config (a
    ``ReportGeneratorConfig``: ``guidance_labels``, ``guidance_thresholds``, ``guidance_align_sides``,
    ``guidance_sentences``, ``guidance_normal_sentences``, ``guidance_normal_report``) asks: side words
    aligned, then the plan (with a normal report) or the findings stated (with a sentence bank).
    Texts are returned as they are where the config asks for no edit or there is no head."""
    texts = list(texts)
    changed_by: list[list[str]] = [[] for _ in texts]
    bank, normal = config.guidance_sentences, config.guidance_normal_report
    if not ((config.guidance_align_sides or bank or normal) and probabilities is not None):
        return PostProcessed(texts, changed_by)
    labels = config.guidance_labels
    # sides by hard_labels' rule (given the finding) even where the prompt used each label at 0.5
    hard = hard_labels(probabilities, config.guidance_thresholds or [0.5] * len(labels), labels)
    sides = likely_sides(probabilities, labels, hard)
    present = [[label for label, on in zip(labels, row) if on] for row in hard.tolist()]

    def apply(step: str, edit) -> None:
        for at, (text, found, known) in enumerate(zip(texts, present, sides, strict=True)):
            edited = edit(text, found, known)
            if edited != text:
                changed_by[at].append(step)
            texts[at] = edited

    if config.guidance_align_sides:
        apply("align_sides", lambda text, found, known: report_edits.align_sides(text, known))
    if normal:
        apply("plan_report", lambda text, found, known: planning.plan_report(text, found, known, bank, normal))
    elif bank:
        normal_sentences = set(config.guidance_normal_sentences)
        apply("state_findings", lambda text, found, known: report_edits.state_findings(
            text, found, known, bank, normal_sentences))
    return PostProcessed(texts, changed_by)


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
