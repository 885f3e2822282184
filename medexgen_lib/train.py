"""Stage 04: the training loop, run by Accelerate (CPU, one GPU, several GPUs or nodes).

One epoch = shuffled training batches (order seeded by epoch, so a resumed run
sees the same batches), then validation on the val split only (``validation``): teacher-forced
loss plus generated reports scored with ``metrics.score``. The best epoch by
``train.selection_metric`` among epochs with the run's evaluation fingerprint is
kept in ``checkpoints/best``, the latest epoch in ``checkpoints/last`` (``checkpoints``);
``train.export`` says which of the two goes to ``models/final``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Subset

from medexgen_lib import guidance
from medexgen_lib.checkpoints import copy_checkpoint, load_checkpoint, save_checkpoint
from medexgen_lib.config import Config
from medexgen_lib.dataset import ReportDataset, collate
from medexgen_lib.features import FrozenFeatures
from medexgen_lib.locks import FolderInUse, folder_lock
from medexgen_lib.model import ReportGenerator
from medexgen_lib.model_card import CARD_FILE, export_card_text
from medexgen_lib.optimization import (NewTokenRows, choose_precision, freeze_batchnorm, freeze_image_side,
                                       make_scheduler, parameter_groups, token_loss)
from medexgen_lib.preprocess import load_split
from medexgen_lib.progress import ProgressBar, progress_log
from medexgen_lib.tokenizer import load_tokenizer
from medexgen_lib.tracking import RunTracker, accelerator_tracking_args, new_run_name
from medexgen_lib.history import append_history, history_records, take_over_folder, truncate_history
from medexgen_lib.validation import evaluation_fingerprint, selection_value, validate

log = logging.getLogger(__name__)

HISTORY_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "clinical macro_F1",
                   "clinical macro_F1 (observations in references)", "clinical micro_F1",
                   "clinical example_F1", "clinical abnormal_recall", "degenerate_predictions")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    best_epoch: int
    best_value: float
    exported_epoch: int
    epochs_run: int
    stopped: str
    final_model: Path
    history: Path


@dataclass
class _Run:
    """What a run trains with (``_build_run``), and its evaluation fingerprint."""

    train_data: ReportDataset
    val_data: ReportDataset
    labels: list[str]
    model: ReportGenerator
    optimizer: torch.optim.Optimizer
    scheduler: object
    epoch_loader: Callable[[int], DataLoader]
    collate_fn: Callable
    loss_hook: guidance.LossHook
    val_targets: guidance.TargetLookup | None
    new_token_rows: NewTokenRows
    fingerprint: str = ""


def train(cfg: Config, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train per ``cfg``; ``resume`` continues from ``checkpoints/last``. ``stop_after_epoch`` ends
    the session after that epoch as an interruption would (checkpoint written, no export), for
    time-boxed sessions and tests. One run per output folder: ``locks.FolderInUse`` names the
    process of a run already in it."""
    tracking = accelerator_tracking_args(cfg)
    # cpu=True without CUDA: under a launcher (accelerate launch / torchrun) that is multi-CPU on gloo.
    # Gradient accumulation is done by _train_epoch (loss normalised over the whole window).
    # A frozen encoder (train.encoder_epochs) leaves parameters without gradients: DDP must know.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.train.encoder_epochs else []
    accelerator = Accelerator(mixed_precision=choose_precision(cfg.train.precision),
                              cpu=not torch.cuda.is_available(), kwargs_handlers=ddp, **tracking)
    with _output_folder_lock(accelerator, cfg.paths.output_dir):
        return _train(cfg, accelerator, tracking, resume, stop_after_epoch, progress)


@contextlib.contextmanager
def _output_folder_lock(accelerator: Accelerator, folder: str) -> Iterator[None]:
    """The main process holds ``folder``'s lock (``locks.folder_lock``) for the run; a refusal
    reaches every process (the others would otherwise wait for it at the first barrier)."""
    with contextlib.ExitStack() as held:
        refusal = [""]
        if accelerator.is_main_process:
            try:
                held.enter_context(folder_lock(folder))
            except FolderInUse as exc:
                refusal = [str(exc)]
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list(refusal)
        if refusal[0]:
            if torch.distributed.is_initialized():  # no gloo thread may outlive the rank at exit
                torch.distributed.destroy_process_group()
            raise FolderInUse(refusal[0])
        yield


def _train(cfg: Config, accelerator: Accelerator, tracking: dict, resume: bool,
           stop_after_epoch: int | None, progress: bool) -> TrainResult:
    """``train``'s run, with the output folder locked."""
    tcfg, paths = cfg.train, cfg.paths
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    run = _build_run(cfg, accelerator)
    state = _start_state(cfg, accelerator, run, resume)
    # A fresh run leaves a previous run's files as they are until its first epoch is done
    # (an error or Ctrl-C before then loses nothing); then history.take_over_folder replaces them all.
    owns_folder = resume
    tracker = RunTracker(accelerator, tracking.get("log_with"))
    tracker.start(cfg, state.setdefault("run_name", new_run_name(cfg)), run.fingerprint, state["step"])

    stopped, last_epoch = "max epochs", tcfg.epochs
    if state["bad_epochs"] >= tcfg.patience:  # a resumed run that had already stopped early
        stopped, last_epoch = _early_stopping(tcfg.patience), state["epoch"]
        log.info("the run stopped early after epoch %d (%s); nothing left to train",
                 state["epoch"], stopped)
    features = (None, None)  # the frozen encoder's of train and val, once it is frozen
    for epoch in range(state["epoch"] + 1, last_epoch + 1):
        began = time.perf_counter()  # the epoch's time includes the frozen encoder's feature cache
        frozen = bool(tcfg.encoder_epochs) and epoch > tcfg.encoder_epochs
        if frozen and features[1] is None:
            features = _freeze_encoder(cfg, accelerator, run)
        _run_epoch(cfg, accelerator, run, state, epoch, progress, tracker, frozen, features, owns_folder, began)
        owns_folder = True
        if state["bad_epochs"] >= tcfg.patience:
            stopped = _early_stopping(tcfg.patience)
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            tracker.finish()
            return TrainResult(state["best_epoch"], state["best_value"], 0, epoch, "interrupted",
                               paths.models / "final", paths.logs / "history.jsonl")

    exported = _export(cfg, accelerator, state, run)
    tracker.finish()
    log.info("best epoch on val %d (%s %.4f); %s; epoch %d (train.export %s) exported to %s",
             state["best_epoch"], tcfg.selection_metric, state["best_value"], stopped, exported,
             tcfg.export, paths.models / "final")
    return TrainResult(state["best_epoch"], state["best_value"], exported, state["epoch"], stopped,
                       paths.models / "final", paths.logs / "history.jsonl")


def _build_run(cfg: Config, accelerator: Accelerator) -> _Run:
    """The splits, the model with its guidance labels, optimizer, schedule and epoch loaders, and
    the run's evaluation fingerprint."""
    tcfg = cfg.train
    train_data = load_split(cfg, "train", augment=cfg.images.augment,
                            shuffle_images_seed=cfg.seed if tcfg.shuffle_images else None)
    val_data = load_split(cfg, "val")
    if not len(train_data) or not len(val_data):
        raise ValueError(f"empty split: {len(train_data)} train / {len(val_data)} val studies; "
                         "check notebook 03's split counts")
    tokenizer = load_tokenizer(cfg.paths.processed / "tokenizer")
    train_texts = [e.text for e in train_data.examples]
    labels = guidance.choose_labels(train_texts, cfg.guidance.min_count) if cfg.guidance.head else []
    model = ReportGenerator.build(cfg.model, tokenizer, cfg.images.size, cfg.text.max_length,
                                  labels, cfg.guidance, train_texts, [e.text for e in val_data.examples])
    loss_hook = guidance.LossHook(cfg, train_data, labels)
    # a model fed 0/1 labels gets its thresholds chosen on val at every validation, so the
    # score that picks the checkpoint is the exported model's
    val_targets = guidance.TargetLookup(val_data.examples, labels) if model.config.guidance_hard else None
    new_token_rows = NewTokenRows(model, tcfg)
    # One kernel per step: 6x faster on CPU. Not under fp16, where a fused step skips an
    # overflowed update inside the kernel and Accelerate could not tell the step was skipped.
    optimizer = torch.optim.AdamW(parameter_groups(model, tcfg), fused=accelerator.mixed_precision != "fp16")
    model, optimizer = accelerator.prepare(model, optimizer)
    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)

    def epoch_loader(epoch: int) -> DataLoader:
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(
            cfg.seed * 100_003 + epoch)).tolist()
        loader = DataLoader(Subset(train_data, order), batch_size=tcfg.batch_size, shuffle=False,
                            collate_fn=collate_fn, num_workers=tcfg.num_workers)
        return accelerator.prepare_data_loader(loader)

    scheduler = make_scheduler(optimizer, tcfg, math.ceil(len(epoch_loader(0)) / tcfg.grad_accum))
    return _Run(train_data, val_data, labels, model, optimizer, scheduler, epoch_loader, collate_fn,
                loss_hook, val_targets, new_token_rows)


def _start_state(cfg: Config, accelerator: Accelerator, run: _Run, resume: bool) -> dict:
    """The trainer's state: a fresh one, or with ``resume`` the one ``checkpoints/last`` holds (model,
    optimizer and schedule restored with it, history lines past it dropped). Sets ``run.fingerprint``."""
    fingerprint, payload = evaluation_fingerprint(cfg, [e.uid for e in run.val_data.examples])
    run.fingerprint = fingerprint
    if not resume:
        return {"epoch": 0, "step": 0, "best_value": -math.inf, "best_epoch": 0, "bad_epochs": 0,
                "fingerprint": fingerprint, "fingerprint_payload": payload, "config": cfg.to_dict()}
    last_dir = cfg.paths.checkpoints / "last"
    state = load_checkpoint(last_dir, accelerator, run.model, run.optimizer, run.scheduler)
    if state["fingerprint"] != fingerprint:
        log.warning("!" * 70 + "\nRESUMING WITH A CHANGED VALIDATION SETUP: fingerprint %s, run's %s.\n"
                    "Epochs from now on are flagged and never picked as best.\n" + "!" * 70,
                    fingerprint, state["fingerprint"])
    if accelerator.is_main_process:
        truncate_history(cfg.paths.logs / "history.jsonl", state["epoch"])
    log.info("resumed from %s after epoch %d (step %d)", last_dir, state["epoch"], state["step"])
    return state


def _freeze_encoder(cfg: Config, accelerator: Accelerator, run: _Run
                    ) -> tuple[FrozenFeatures | None, FrozenFeatures]:
    """``train.encoder_epochs`` are over: the image side stops training, and its features of train
    (unless images are augmented: other features every epoch) and of val are computed once."""
    unwrapped = accelerator.unwrap_model(run.model)
    freeze_image_side(unwrapped, True, cfg.train.freeze_head)
    train_features = None
    if not cfg.images.augment:
        train_features = FrozenFeatures(unwrapped, run.train_data, run.collate_fn, accelerator.device)
    return train_features, FrozenFeatures(unwrapped, run.val_data, run.collate_fn, accelerator.device)


def _run_epoch(cfg: Config, accelerator: Accelerator, run: _Run, state: dict, epoch: int, progress: bool,
               tracker: RunTracker, frozen: bool, features: tuple, owns_folder: bool, began: float) -> None:
    """Train one epoch (begun at ``began``) and validate it; update ``state`` (best epoch, patience);
    write its history line (``history.take_over_folder`` on a fresh run's first epoch) and checkpoints."""
    tcfg, fingerprint = cfg.train, run.fingerprint
    train_loss, samples, state["step"] = _train_epoch(
        accelerator, run.model, run.optimizer, run.scheduler, run.epoch_loader(epoch), run.new_token_rows,
        tcfg, epoch, state["step"], progress, run.loss_hook, tracker, frozen, features[0])
    seconds_train = time.perf_counter() - began
    _sync_buffers(accelerator, run.model)
    metrics, val_loss, val_rows = validate(accelerator, run.model, run.val_data, run.collate_fn, cfg,
                                           progress, features[1], run.val_targets)
    value = selection_value(metrics, tcfg.selection_metric)
    if tcfg.scheduler == "plateau":
        run.scheduler.step(value)
    fingerprint_ok = fingerprint == state["fingerprint"]
    improved = fingerprint_ok and value > state["best_value"]
    record = {"epoch": epoch, "step": state["step"], "train_loss": train_loss, "val_loss": val_loss,
              "val": {k: metrics[k] for k in HISTORY_METRICS if k in metrics},
              "val_distinct_predictions": metrics["distinct_predictions"],
              "selection_metric": tcfg.selection_metric, "selection_value": value,
              "learning_rates": {g["name"]: g["lr"] for g in run.optimizer.param_groups},
              "seconds": time.perf_counter() - began,
              "samples_per_s": samples * accelerator.num_processes / seconds_train,
              "fingerprint": fingerprint, "fingerprint_ok": fingerprint_ok, "best": improved}
    if not fingerprint_ok:
        log.warning("epoch %d: evaluation fingerprint %s differs from the run's %s; "
                    "flagged, not eligible as best", epoch, fingerprint, state["fingerprint"])
    tracker.epoch(state["step"], epoch, metrics, val_loss, train_loss, fingerprint, fingerprint_ok, val_rows)
    if improved:
        state.update(best_value=value, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    if accelerator.is_main_process and not owns_folder:
        take_over_folder(cfg, record)
    elif accelerator.is_main_process:  # before the checkpoint: a resume drops lines past it
        append_history(cfg.paths.logs / "history.jsonl", record)
    last_dir, best_dir = cfg.paths.checkpoints / "last", cfg.paths.checkpoints / "best"
    if improved:  # best first (a crash in between re-trains this epoch), then last as its copy
        save_checkpoint(best_dir, accelerator, run.model, run.optimizer, run.scheduler, state)
        copy_checkpoint(best_dir, last_dir, accelerator)
    else:
        save_checkpoint(last_dir, accelerator, run.model, run.optimizer, run.scheduler, state)
    progress_log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f%s", epoch, tcfg.epochs,
                      train_loss, val_loss, tcfg.selection_metric, value, " (best)" if improved else "")


def _export(cfg: Config, accelerator: Accelerator, state: dict, run: _Run) -> int:
    """Write ``models/final`` from the best or the last checkpoint (``train.export``), with its run
    config and model card; returns the exported epoch."""
    if state["best_epoch"] == 0:  # the same on every process: all raise, none waits below
        raise RuntimeError("no epoch had the run's evaluation fingerprint; nothing to export")
    exported = state["best_epoch"]
    if cfg.train.export == "last":  # unless the last epoch was validated with other settings
        exported = state["epoch"] if run.fingerprint == state["fingerprint"] else state["best_epoch"]
        if exported != state["epoch"]:
            log.warning("train.export last: epoch %d was validated with other settings than the run's; "
                        "exporting the best epoch on val (%d) instead", state["epoch"], exported)
    if accelerator.is_main_process:
        # with the thresholds its val score used
        checkpoint = "last" if exported == state["epoch"] else "best"
        model_out = ReportGenerator.from_pretrained(cfg.paths.checkpoints / checkpoint)
        if model_out.config.guidance_thresholds:
            log.info("observation thresholds chosen on val: %s",
                     dict(zip(run.labels, model_out.config.guidance_thresholds)))
        record = [h for h in history_records(cfg.paths.logs / "history.jsonl") if h["epoch"] == exported][-1]
        model_out.save_pretrained(cfg.paths.models / "final", extra_files={
            "run_config.json": json.dumps(cfg.to_dict(), indent=2),
            CARD_FILE: export_card_text(cfg, model_out, record)})
    accelerator.wait_for_everyone()
    return exported


def _early_stopping(patience: int) -> str:
    return f"early stopping: no improvement for {patience} epochs"


def _train_epoch(accelerator, model, optimizer, scheduler, loader, new_token_rows, tcfg, epoch,
                 step, progress, loss_hook, tracker: RunTracker, frozen: bool = False,
                 features: FrozenFeatures | None = None) -> tuple[float, int, int]:
    """One epoch; every ``grad_accum`` micro-batches (the epoch's last window may be shorter)
    make one optimizer step whose loss is the token mean over the whole window, plus
    ``guidance.loss_weight`` x the observation head's BCE averaged over the window's studies.
    ``frozen``: the encoder (and with ``train.freeze_head`` the head) no longer trains;
    ``features``: the encoder's cached outputs
    (none where images are augmented)."""
    model.train()
    if tcfg.encoder_epochs:
        freeze_image_side(accelerator.unwrap_model(model), frozen, tcfg.freeze_head)
    if tcfg.freeze_batchnorm:
        freeze_batchnorm(accelerator.unwrap_model(model))
    total, count, samples = 0.0, 0, 0
    bar = ProgressBar(total=len(loader), desc=f"epoch {epoch}/{tcfg.epochs}", unit="batch", leave=False,
                      disable=not (progress and accelerator.is_local_main_process))
    for window in _windows(loader, tcfg.grad_accum):
        tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in window)
        studies = sum(batch["input_ids"].shape[0] for batch in window)
        totals = accelerator.reduce(torch.tensor([tokens, studies], device=accelerator.device), "sum")
        # DDP averages gradients over processes; these factors make the result a sum over all.
        token_scale = accelerator.num_processes / max(1, int(totals[0]))
        study_scale = accelerator.num_processes / max(1, int(totals[1]))
        window_loss = 0.0
        for index, batch in enumerate(window):
            last = index == len(window) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                cached = {"features": features(batch["uids"])} if features is not None else {}
                out = model(batch["images"], batch["input_ids"], batch["attention_mask"],
                            view_mask=batch["view_mask"], **loss_hook.inputs(batch, accelerator.device),
                            **cached)
                loss_sum, scored = token_loss(out.logits, batch["labels"], tcfg.label_smoothing)
                objective = loss_sum * token_scale
                if getattr(out, "observation_loss", None) is not None:
                    objective = objective + (loss_hook.weight * out.observation_loss
                                             * batch["input_ids"].shape[0] * study_scale)
                finite = accelerator.gather(torch.isfinite(objective.detach()).reshape(1)).all()
                mean = loss_sum.item() / max(1, int(scored))
                if not finite:
                    raise NonFiniteLoss(
                        f"loss became {mean} at epoch {epoch}, step {step}; run stopped. "
                        "The last good checkpoint is intact in checkpoints/last; lower the learning "
                        "rates or use train.precision='no' and resume")
                accelerator.backward(objective)
            total += mean
            window_loss += mean / len(window)
            count += 1
            samples += batch["input_ids"].shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        accelerator.clip_grad_norm_(model.parameters(), tcfg.clip_grad_norm)
        new_token_rows.before_step()
        optimizer.step()
        new_token_rows.after_step()
        if not accelerator.optimizer_step_was_skipped:
            step += 1
            if tcfg.scheduler != "plateau":
                scheduler.step()
        optimizer.zero_grad()
        tracker.batch(window_loss, step, optimizer.param_groups)
    bar.close()
    return total / max(1, count), samples, step


def _windows(loader: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """The loader's batches in lists of ``size`` (the last one may be shorter)."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


@torch.no_grad()
def _sync_buffers(accelerator, model) -> None:
    """Give every process rank 0's BatchNorm statistics (DDP syncs gradients, not these),
    so all processes validate, decide and save the same model."""
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer.data, src=0)
