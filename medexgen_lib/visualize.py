"""Stage 06 figures: training summary, prediction gallery, attention maps, label and length plots."""

from __future__ import annotations

import os
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from medexgen_lib.files import read_json, save_figure
from medexgen_lib.labeler import NO_FINDING, OBSERVATIONS, POSITIVE
from medexgen_lib.history import load_history, mark_epochs

AGREE, MISSED, INVENTED = "#2e7d32", "#c62828", "#ef6c00"  # green, red, orange


def _save(fig, path: Path | None) -> Path | None:
    """Save (figure stays open, so the notebook shows it) when a path is given."""
    return save_figure(fig, path, close=False) if path is not None else None


# --------------------------------------------------------------------------- training summary

def visualize_training_summary(log_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                               model_dir: str | os.PathLike | None = None):
    """Loss, validation metrics and learning rates per epoch from ``history.jsonl``.

    The best epoch is marked with a dashed line, the one exported to ``model_dir`` (its
    model card says which) dotted where it is another; epochs whose evaluation
    fingerprint differs from the run's are shaded red (never eligible as best).
    Saved as PNG when ``out_path`` is given; returns the figure (shown inline).
    """
    history = load_history(Path(log_dir) / "history.jsonl")
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    axes[0].set(title="Loss", xlabel="epoch")
    for name in ("BLEU-4", "ROUGE-L", "clinical macro_F1", "clinical example_F1"):
        axes[1].plot(epochs, [h["val"].get(name) for h in history], "o-", label=name)
    axes[1].set(title="Validation metrics", xlabel="epoch", ylim=(0, 1))
    for group in history[0]["learning_rates"] if history else []:
        axes[2].plot(epochs, [h["learning_rates"][group] for h in history], label=group)
    axes[2].set(title="Learning rate at epoch end", xlabel="epoch", yscale="log")
    for ax in axes[:2]:
        for h in history:
            if not h["fingerprint_ok"]:
                ax.axvspan(h["epoch"] - 0.5, h["epoch"] + 0.5, color="red", alpha=0.15,
                           label="other evaluation fingerprint" if h is history[-1] else None)
        mark_epochs(ax, history, Path(model_dir) if model_dir is not None else None)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)
    return fig


# --------------------------------------------------------------------------- gallery

def label_comparison(reference_labels: dict, predicted_labels: dict) -> dict[str, str]:
    """Per observation positive in either: 'agree', 'missed' (only in reference) or 'invented'."""
    out = {}
    for obs in OBSERVATIONS:
        ref, pred = reference_labels.get(obs) == POSITIVE, predicted_labels.get(obs) == POSITIVE
        if ref or pred:
            out[obs] = "agree" if ref and pred else "missed" if ref else "invented"
    return out


def load_predictions(log_dir: str | os.PathLike, split: str = "test") -> list[dict]:
    """Rows of ``logs/predictions_<split>.json`` (written by notebook 05)."""
    path = Path(log_dir) / f"predictions_{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run notebook 05_evaluation first")
    return read_json(path)


def evaluated_model_dir(log_dir: str | os.PathLike, split: str = "test") -> Path:
    """The model folder notebook 05 evaluated, as recorded in ``logs/metrics_<split>.json``."""
    path = Path(log_dir) / f"metrics_{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run notebook 05_evaluation first")
    return Path(read_json(path)["model_dir"])


def visualize_model_predictions(model_dir: str | os.PathLike, split: str = "test", n: int = 6,
                                seed: int = 0, cfg=None, out_path: str | os.PathLike | None = None):
    """A gallery of ``n`` random studies: both views, reference and generated report side by side,
    observations coloured: green agree, red missed, orange invented.

    Predictions come from ``logs/predictions_<split>.json`` when it was written by
    this model (notebook 05), else they are generated now.
    """
    from medexgen_lib.config import load_config
    from medexgen_lib.reporting import generate_reports
    from medexgen_lib.labeler import label_report
    from medexgen_lib.metrics import prediction_labels
    from medexgen_lib.model import ReportGenerator
    from medexgen_lib.preprocess import load_split

    cfg = cfg or load_config("demo")
    data = load_split(cfg, split)
    try:
        rows = {r["uid"]: r for r in load_predictions(cfg.paths.logs, split)}
    except FileNotFoundError:
        rows = {}
    index = {e.uid: i for i, e in enumerate(data.examples)}
    chosen = random.Random(seed).sample(sorted(index), min(n, len(index)))
    if any(uid not in rows for uid in chosen):
        model = ReportGenerator.from_pretrained(model_dir)
        subset = _subset(data, [index[u] for u in chosen])
        rows = {r["uid"]: {**r, "reference_labels": label_report(r["reference"]),
                           "prediction_labels": prediction_labels(r["prediction"], r["decoder_text"])}
                for r in generate_reports(model, subset, cfg.eval, progress=False)}
    fig, axes = plt.subplots(len(chosen), 3, figsize=(15, 3.2 * len(chosen)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 3.2]})
    for ax_row, uid in zip(axes, chosen):
        pixels = data.pixels(index[uid]).numpy()
        for v in range(2):
            ax_row[v].imshow(pixels[v], cmap="gray")
            ax_row[v].set_title(f"{uid} {'frontal' if v == 0 else 'lateral'}", fontsize=9)
            ax_row[v].axis("off")
        row = rows[uid]
        ax = ax_row[2]
        ax.axis("off")
        ax.text(0, 1, "REFERENCE: " + _wrap(row["reference"]), va="top", fontsize=8.5, transform=ax.transAxes)
        ax.text(0, 0.55, "GENERATED: " + _wrap(row["prediction"]), va="top", fontsize=8.5,
                transform=ax.transAxes)
        status = label_comparison(row["reference_labels"], row["prediction_labels"])
        x = 0.0
        for obs, verdict in status.items():
            if obs == NO_FINDING and verdict == "agree":
                continue
            color = {"agree": AGREE, "missed": MISSED, "invented": INVENTED}[verdict]
            ax.text(x, 0.04, f"{obs} ({verdict})", color="white", fontsize=8, transform=ax.transAxes,
                    bbox={"facecolor": color, "edgecolor": "none", "pad": 2})
            x += 0.03 + 0.0105 * len(f"{obs} ({verdict})")
    fig.suptitle("Observations: green agree, red missed, orange invented", y=1.0)
    fig.tight_layout()
    _save(fig, out_path)
    return fig


def _subset(data, indices: list[int]):
    import copy

    subset = copy.copy(data)
    subset.examples = [data.examples[i] for i in indices]
    return subset


def _wrap(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# --------------------------------------------------------------------------- attention

@torch.no_grad()
def cross_attention_maps(model, pixels: torch.Tensor, view_mask: torch.Tensor, token_ids: list[int],
                         layers: str | list[int] = "all", heads: str = "mean") -> torch.Tensor:
    """Cross-attention of each generated token to the visual tokens: ``[T, V, G, G]``.

    Teacher-forces ``[bos] + token_ids`` through the decoder with eager attention
    and averages over ``layers`` (``"all"``, ``"last"`` or indices) and heads
    (``"mean"`` or ``"max"``). ``pixels`` is one normalised study ``[V, 3, H, W]``.

    What this shows: where in the grid of visual tokens the decoder read while
    writing a word. What it does not show: why the word was written (attention
    is not attribution; the decoder also reads its own text, and the visual
    tokens mix information from the whole image through the ResNet's receptive
    field), nor finer detail than the 32-pixel grid.
    """
    previous = model.decoder.config._attn_implementation
    model.decoder.set_attn_implementation("eager")
    try:
        ids = torch.tensor([[model.config.bos_token_id, *token_ids]], device=pixels.device)
        out = model(pixels.unsqueeze(0), ids, view_mask=view_mask.unsqueeze(0), output_attentions=True)
    finally:
        model.decoder.set_attn_implementation(previous)
    # per layer: [1, heads, prompt + T+1, S]; the guidance prompt's rows come first
    attentions = [a[:, :, model.prompt_length:] for a in out.cross_attentions]
    chosen = {"all": range(len(attentions)), "last": [len(attentions) - 1]}.get(layers, layers)
    stacked = torch.stack([attentions[i][0] for i in chosen])  # [L, heads, T+1, S]
    per_head = stacked.mean(0)
    combined = per_head.mean(0) if heads == "mean" else per_head.max(0).values
    # The logits at position t predict token t+1, so token k was written while reading from row k.
    maps = combined[: len(token_ids)]
    grid = model.config.grid_size
    return maps.reshape(len(token_ids), pixels.shape[0], grid, grid).cpu()


def token_positions(tokenizer, token_ids: list[int], phrase: str) -> list[int]:
    """Indices of the generated tokens that make up the first occurrence of ``phrase``."""
    text, spans = "", []
    for token_id in token_ids:
        piece = tokenizer.decode([token_id])
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    start = text.lower().find(phrase.lower().strip())
    if start < 0:
        raise ValueError(f"{phrase!r} is not in the generated report: {text!r}")
    end = start + len(phrase.strip())
    return [i for i, (a, b) in enumerate(spans) if a < end and b > start]


def attention_overlay(model, pixels_uint8: torch.Tensor, view_mask: torch.Tensor, token_ids: list[int],
                      phrase: str, layers: str | list[int] = "all", heads: str = "mean") -> np.ndarray:
    """Per view, the attention for ``phrase`` upsampled to the image: ``[V, H, W]`` in [0, 1]."""
    from medexgen_lib.images import normalize

    pixels = normalize(pixels_uint8)
    maps = cross_attention_maps(model, pixels, view_mask, token_ids, layers, heads)
    positions = token_positions(model.tokenizer, token_ids, phrase)
    phrase_map = maps[positions].mean(0)  # [V, G, G]
    phrase_map = phrase_map / phrase_map.amax().clamp_min(1e-12)
    size = pixels_uint8.shape[-1]
    return F.interpolate(phrase_map.unsqueeze(1), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].numpy()


FINDING_WORDS = ("effusion", "cardiomegaly", "pneumothorax", "consolidation", "edema", "nodule", "mass")


def attention_example(rows: list[dict]) -> tuple[dict, str] | None:
    """A prediction and a word in it worth an attention map: a finding word if any is written."""
    written = [r for r in rows if r["prediction"].split()]
    for word in FINDING_WORDS:
        for row in written:
            if word in row["prediction"].lower():
                return row, word
    if not written:
        return None
    return written[0], written[0]["prediction"].split()[0].strip(".,;:")


def visualize_attention(model, pixels_uint8: torch.Tensor, view_mask: torch.Tensor, token_ids: list[int],
                        phrase: str, layers="all", heads="mean", out_path=None, title: str = ""):
    """Both views with the decoder's cross-attention for ``phrase`` overlaid (see
    ``cross_attention_maps`` for what such maps do and do not show)."""
    overlay = attention_overlay(model, pixels_uint8, view_mask, token_ids, phrase, layers, heads)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for v, ax in enumerate(axes):
        ax.imshow(pixels_uint8[v].numpy(), cmap="gray")
        ax.imshow(overlay[v], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(f"{'frontal' if v == 0 else 'lateral'}: \"{phrase}\"", fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out_path)
    return fig


# --------------------------------------------------------------------------- label and length plots

def visualize_label_agreement(rows: list[dict], out_path=None):
    """Per observation: counts of both positive / reference only (missed) / prediction only
    (invented), confusion-style, for the observations that occur."""
    names = [o for o in OBSERVATIONS
             if any(r["reference_labels"][o] == POSITIVE or r["prediction_labels"][o] == POSITIVE for r in rows)]
    counts = np.zeros((len(names), 3), dtype=int)
    for i, obs in enumerate(names):
        for r in rows:
            ref, pred = r["reference_labels"][obs] == POSITIVE, r["prediction_labels"][obs] == POSITIVE
            if ref and pred:
                counts[i, 0] += 1
            elif ref:
                counts[i, 1] += 1
            elif pred:
                counts[i, 2] += 1
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.5))
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    ax.set_xticks(range(3), ["both positive", "missed\n(reference only)", "invented\n(prediction only)"])
    ax.set_yticks(range(len(names)), names)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > counts.max() / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_title(f"Reference vs prediction labels ({len(rows)} studies)")
    fig.tight_layout()
    _save(fig, out_path)
    return fig


def visualize_report_lengths(rows: list[dict], out_path=None):
    """Report length in words, reference vs generated: histograms and a per-study scatter."""
    ref = np.array([len(r["reference"].split()) for r in rows])
    gen = np.array([len(r["prediction"].split()) for r in rows])
    fig, (hist_ax, scatter_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.linspace(0, max(ref.max(initial=1), gen.max(initial=1)) + 1, 30)
    hist_ax.hist(ref, bins=bins, alpha=0.6, label=f"reference (mean {ref.mean():.1f})")
    hist_ax.hist(gen, bins=bins, alpha=0.6, label=f"generated (mean {gen.mean():.1f})")
    hist_ax.set(title="Report length", xlabel="words", ylabel="studies")
    hist_ax.legend()
    scatter_ax.scatter(ref, gen, alpha=0.5, s=14)
    top = bins[-1]
    scatter_ax.plot([0, top], [0, top], "k--", lw=1)
    scatter_ax.set(title="Per study", xlabel="reference words", ylabel="generated words")
    fig.tight_layout()
    _save(fig, out_path)
    return fig
