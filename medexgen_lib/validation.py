"""Validation during training: the val split's loss and scored reports, the frozen evaluation
fingerprint, and the value that picks the best epoch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from medexgen_lib import guidance
from medexgen_lib.config import Config
from medexgen_lib.dataset import ReportDataset
from medexgen_lib.features import FrozenFeatures
from medexgen_lib.labeler import LABELER_VERSION
from medexgen_lib.metrics import METRICS_VERSION, diversity, score
from medexgen_lib.reporting import decode_settings, generate_reports


def evaluation_fingerprint(cfg: Config, val_uids: list[str]) -> tuple[str, dict]:
    """Hash of everything that decides validation scores; frozen for a run."""
    payload = {"decode": decode_settings(cfg.eval), "max_length": cfg.text.max_length,
               "target": cfg.text.target, "lowercase": cfg.text.lowercase,
               "val_uids": sorted(val_uids), "metrics_version": METRICS_VERSION,
               "labeler_version": LABELER_VERSION,
               "selection_metric": cfg.train.selection_metric,
               "uncertain_as_positive": cfg.eval.uncertain_as_positive,
               "align_sides": cfg.guidance.align_sides, "state_findings": cfg.guidance.state_findings,
               # named only where set, so that runs from before these settings keep their fingerprint
               **({"plan_reports": True} if cfg.guidance.plan_reports else {}),
               **({"min_auroc": cfg.guidance.min_auroc} if cfg.guidance.min_auroc else {})}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return digest, payload


def selection_value(metrics: dict, selection_metric: str) -> float:
    """``train.selection_metric`` of the val metrics: one metric's name, or several joined by
    " + " (their sum, e.g. "clinical macro_F1 + BLEU-4" for reports both right and well worded)."""
    names = [name.strip() for name in selection_metric.split(" + ")]
    unknown = [name for name in names if name not in metrics]
    if unknown:
        raise KeyError(f"train.selection_metric names {unknown}, not a validation metric; "
                       f"known: {sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
    return float(sum(metrics[name] for name in names))


@torch.no_grad()
def validate(accelerator: Accelerator, model: nn.Module, val_data: ReportDataset, collate_fn: Callable,
             cfg: Config, progress: bool, features: FrozenFeatures | None = None,
             targets: guidance.TargetLookup | None = None) -> tuple[dict, float, list[dict]]:
    """Val loss, scored generations and the generated rows. Every process computes the same
    numbers (no test split). ``features``: the frozen encoder's ``FrozenFeatures`` of val (else
    computed here); ``targets`` (a ``guidance.TargetLookup`` of val): the head's thresholds are
    chosen on val (``guidance.choose_thresholds``) before the val loss and the reports."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    loader = DataLoader(val_data, batch_size=cfg.eval.batch_size, shuffle=False, collate_fn=collate_fn)
    losses, weights = [], []
    with accelerator.autocast():
        if features is None:  # the encoder once for the thresholds, the val loss and the reports
            features = FrozenFeatures(unwrapped, val_data, collate_fn, accelerator.device, cfg.eval.batch_size)
        if targets is not None:  # first, so that the val loss is the exported model's too
            _choose_thresholds(unwrapped, loader, targets, accelerator.device, features, cfg.guidance.min_auroc)
        for batch in loader:
            out = unwrapped(batch["images"].to(accelerator.device), batch["input_ids"].to(accelerator.device),
                            batch["attention_mask"].to(accelerator.device),
                            labels=batch["labels"].to(accelerator.device),
                            view_mask=batch["view_mask"].to(accelerator.device),
                            features=features(batch["uids"]))
            losses.append(out.loss.item())
            weights.append(int((batch["labels"][:, 1:] != -100).sum()))
        rows = generate_reports(unwrapped, val_data, cfg.eval, accelerator.device,
                                progress=progress and accelerator.is_local_main_process, features=features)
    metrics = score([r["reference"] for r in rows], [r["prediction"] for r in rows], meteor=False,
                    uncertain_as_positive=cfg.eval.uncertain_as_positive,
                    decoder_texts=[r["decoder_text"] for r in rows])
    metrics["distinct_predictions"] = diversity([r["prediction"] for r in rows])["distinct_predictions"]
    unwrapped.train()
    return metrics, float(np.average(losses, weights=weights)), rows


def _choose_thresholds(model, loader, targets, device, features, min_auroc: float = 0.0) -> None:
    """Set ``model``'s observation thresholds to those ``guidance.choose_thresholds`` picks on
    the head's probabilities for ``loader``'s (val) studies (``features``: their encoder maps;
    ``min_auroc``: ``guidance.min_auroc``)."""
    probabilities, truth = [], []
    for batch in loader:  # the head alone: no decoder inputs are built
        view_mask = batch["view_mask"].to(device)
        logits = model.guidance.logits(features(batch["uids"]), view_mask.shape[0], view_mask)
        probabilities.append(logits.float().sigmoid().cpu())
        truth.append(targets(batch["uids"], "cpu"))
    model.config.guidance_thresholds = guidance.choose_thresholds(
        torch.cat(probabilities), torch.cat(truth), model.config.guidance_labels, min_auroc)
