"""Live training curves through Accelerate's trackers (TensorBoard by default).

``train.log_with`` names the tracker: ``"tensorboard"`` (default), ``"none"``, or
any other tracker Accelerate supports that is installed here (``"mlflow"``,
``"wandb"``, ...). Logs go to ``IUXRAY_OUTPUT_PIPELINE/logs/tensorboard/<run>``;
Accelerate's trackers write from the main process only. What is logged:

- ``train/loss`` (mean over the micro-batches of each optimizer step) and
  ``lr/<parameter group>`` at every optimizer step;
- ``val/loss``, ``train/epoch_loss`` and every numeric validation metric
  (``val/<metric>``, ``val_per_observation/<observation> F1``) once per epoch,
  at the step the epoch ended, so train and val curves share one x axis;
- the evaluation fingerprint (hyperparameter and text each epoch, with
  ``val/fingerprint_ok``), a few generated val reports as text per epoch
  (TensorBoard only), and the run config flattened to scalars as hyperparameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medexgen_lib.config import Config, ConfigError

log = logging.getLogger(__name__)

TRACKER_DIR = "tensorboard"  # under paths.logs
TEXT_EXAMPLES = 3  # generated val reports shown per epoch


def tracker_names() -> list[str]:
    """Every tracker name Accelerate knows (installed or not)."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


def resolve_log_with(name: str) -> str | None:
    """The tracker for ``train.log_with``, or None for ``"none"``; refuses a name Accelerate
    does not know, or one whose package is not installed, in one sentence naming it."""
    if name == "none":
        return None
    from accelerate.tracking import get_available_trackers

    if name not in tracker_names():
        raise ConfigError(f"train.log_with must be 'none' or one of Accelerate's trackers "
                          f"({', '.join(tracker_names())}), got {name!r}")
    if name not in [str(getattr(t, "value", t)) for t in get_available_trackers()]:
        raise ConfigError(f"train.log_with={name!r}: its package is not installed here; install it "
                          "or set train.log_with to 'none'")
    return name


def tracker_dir(cfg: Config) -> Path:
    """Folder that holds one sub-folder per run (TensorBoard's --logdir)."""
    return cfg.paths.logs / TRACKER_DIR


def new_run_name(cfg: Config) -> str:
    """``<profile>_seed<seed>_<UTC time>``: a resumed run keeps the name it started with."""
    return f"{cfg.profile}_seed{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def flatten(values: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested config dict -> ``{"train.lr_new": 0.001, ...}`` with only scalar or string values
    (what trackers accept as hyperparameters); None and lists become strings."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def epoch_scalars(metrics: dict, val_loss: float, train_loss: float, fingerprint_ok: bool
                  ) -> dict[str, float]:
    """Every numeric validation figure of an epoch, under TensorBoard tags."""
    scalars = {"val/loss": val_loss, "train/epoch_loss": train_loss,
               "val/fingerprint_ok": float(fingerprint_ok)}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n":
            scalars[f"val/{key}"] = float(value)
    for name, figures in metrics.get("clinical per_observation", {}).items():
        if figures["support"] or figures["predicted"]:
            scalars[f"val_per_observation/{name} F1"] = float(figures["f1"])
    return scalars


def examples_markdown(rows: Sequence[dict], limit: int = TEXT_EXAMPLES) -> str:
    """A markdown table of the first ``limit`` generated val reports beside their references."""
    def cell(text: str) -> str:
        return (text or "").replace("|", "\\|").replace("\n", " ")

    lines = ["| study | reference | generated |", "|---|---|---|"]
    lines += [f"| {cell(r['uid'])} | {cell(r['reference'])} | {cell(r['prediction'])} |"
              for r in rows[:limit]]
    return "\n".join(lines)


class RunTracker:
    """The run's trackers, reached through the Accelerator; does nothing for ``log_with="none"``."""

    def __init__(self, accelerator, log_with: str | None):
        self.accelerator = accelerator
        self.active = log_with is not None
        self.log_with = log_with
        self._losses: list[float] = []
        self._last_step = 0

    def start(self, cfg: Config, run_name: str, fingerprint: str, step: int) -> None:
        """Open the run (``tracker_dir(cfg)/run_name``; a resumed run appends to it from
        optimizer step ``step`` on) and store the config as hyperparameters."""
        if not self.active:
            return
        self._last_step = step
        hparams = {**flatten(cfg.to_dict()), "evaluation_fingerprint": fingerprint}
        self.accelerator.init_trackers(run_name, config=hparams)
        if self.accelerator.is_main_process:
            log.info("live curves: tensorboard --logdir %s", tracker_dir(cfg))

    def batch(self, loss: float, step: int, param_groups: Sequence[dict]) -> None:
        """Called after every batch with the optimizer step count; when it moved, log the mean
        loss of the micro-batches since the last step and each parameter group's learning rate."""
        if not self.active:
            return
        self._losses.append(loss)
        if step != self._last_step:
            values = {"train/loss": sum(self._losses) / len(self._losses)}
            values.update({f"lr/{group['name']}": float(group["lr"]) for group in param_groups})
            self.accelerator.log(values, step=step)
            self._losses, self._last_step = [], step

    def epoch(self, step: int, epoch: int, metrics: dict, val_loss: float, train_loss: float,
              fingerprint: str, fingerprint_ok: bool, rows: Sequence[dict]) -> None:
        """Log an epoch's validation figures, its fingerprint and a few generated reports."""
        if not self.active:
            return
        self.accelerator.log({**epoch_scalars(metrics, val_loss, train_loss, fingerprint_ok),
                              "epoch": epoch}, step=step)
        if self.log_with == "tensorboard" and self.accelerator.is_main_process:
            writer = self.accelerator.get_tracker("tensorboard").tracker
            writer.add_text("val/generated_reports", examples_markdown(rows), global_step=step)
            writer.add_text("run/evaluation_fingerprint",
                            f"epoch {epoch}: `{fingerprint}`" + ("" if fingerprint_ok else
                                                                 " (differs from the run's: flagged)"),
                            global_step=step)
            writer.flush()

    def finish(self) -> None:
        """Flush and close the trackers (not ``accelerator.end_training()``, which would also
        tear down the process group that a launcher's later steps still use)."""
        if self.active:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def accelerator_tracking_args(cfg: Config) -> dict[str, Any]:
    """``log_with``/``project_dir`` for ``Accelerator(...)`` from ``train.log_with``."""
    name = resolve_log_with(cfg.train.log_with)
    if name is None:
        return {}
    return {"log_with": name, "project_dir": str(tracker_dir(cfg))}
