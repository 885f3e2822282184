"""Training's history file (``logs/history.jsonl``, one JSON line per epoch): written, read and
plotted as training curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medexgen_lib.config import Config
from medexgen_lib.files import discard_dir, save_figure, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)


def take_over_folder(cfg: Config, record: dict) -> None:
    """A fresh run's first epoch is done: the previous run's checkpoints and exported model go
    (they belong to its history), then this run's config and history replace the previous run's,
    just before this epoch's checkpoints are written. In that order an interruption leaves the
    previous run's history without its checkpoints, or this run's history without checkpoints
    (nothing to resume), never a checkpoint or model of one run beside the history of another."""
    paths = cfg.paths
    for folder in (paths.models / "final", paths.checkpoints / "best", paths.checkpoints / "last"):
        discard_dir(folder)
    cfg.save(paths.logs / "config_04_training.json")
    write_text_atomic(paths.logs / "history.jsonl", json.dumps(record) + "\n")


def append_history(path: Path, record: dict) -> None:
    """One epoch's line at the end of ``path``."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def load_history(path: Path) -> list[dict]:
    """The epochs of ``logs/history.jsonl``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run notebook 04_training first")
    return history_records(path)


def history_records(path: Path) -> list[dict]:
    """Parsed history lines; a line torn by a kill or a full disk is skipped with a warning."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is damaged (a run stopped while writing it); skipped", path, number)
    return records


def truncate_history(path: Path, last_epoch: int) -> None:
    """Drop history lines after the checkpoint's epoch (a kill may have left some)."""
    if not path.exists():
        return
    kept = [record for record in history_records(path) if record["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def mark_epochs(ax: Axes, history: list[dict], model_dir: Path | None) -> None:
    """Dashed line at the best epoch on val; dotted at the one exported to ``model_dir`` (as its
    model card says) where that is another."""
    from medexgen_lib.model_card import exported_epoch

    best = [h["epoch"] for h in history if h["best"]]
    if best:
        ax.axvline(best[-1], color="black", ls="--", label=f"best on val (epoch {best[-1]})")
    exported = exported_epoch(model_dir) if model_dir is not None else None
    if exported is not None and exported not in best[-1:]:
        ax.axvline(exported, color="black", ls=":", label=f"exported (epoch {exported})")


def plot_training_curves(history: list[dict], path: Path, model_dir: Path | None = None) -> Path:
    """Train/val loss and the selection metric per epoch; the best epoch, the one exported to
    ``model_dir`` (``train.export``) and flagged epochs marked."""
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    loss_ax.legend()
    name = history[0]["selection_metric"] if history else "selection metric"
    metric_ax.plot(epochs, [h["selection_value"] for h in history], "o-", color="seagreen", label=name)
    for h in history:
        if not h["fingerprint_ok"]:
            metric_ax.axvspan(h["epoch"] - 0.5, h["epoch"] + 0.5, color="red", alpha=0.15)
    mark_epochs(metric_ax, history, model_dir)
    metric_ax.set(title="Validation (red: other evaluation fingerprint)", xlabel="epoch", ylabel=name)
    metric_ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
