"""Stage 04: the training loop, run by Accelerate (CPU, one GPU, several GPUs or nodes).

One epoch = shuffled training batches (order seeded by epoch, so a resumed run
sees the same batches), then validation on the val split only: teacher-forced
loss plus generated reports scored with ``metrics.score``. The best epoch by
``train.selection_metric`` among epochs with the run's evaluation fingerprint is
kept in ``checkpoints/best``, the latest epoch in ``checkpoints/last``; ``train.export``
says which of the two goes to ``models/final``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from transformers import get_scheduler

from medexgen_lib import guidance
from medexgen_lib.config import Config, TrainConfig
from medexgen_lib.dataset import collate
from medexgen_lib.features import FrozenFeatures
from medexgen_lib.files import discard_dir, honour_umask, read_json, save_figure, write_text_atomic
from medexgen_lib.labeler import LABELER_VERSION
from medexgen_lib.locks import FolderInUse, folder_lock
from medexgen_lib.metrics import METRICS_VERSION, diversity, score
from medexgen_lib.model import (CROSS_ATTENTION_PARTS, ReportGenerator, first_load_error,
                                recover_dir, replace_dir, write_errors_named)
from medexgen_lib.model_card import CARD_FILE, export_card_text
from medexgen_lib.preprocess import load_split
from medexgen_lib.progress import ProgressBar, progress_log
from medexgen_lib.reporting import decode_settings, generate_reports
from medexgen_lib.tokenizer import load_tokenizer
from medexgen_lib.tracking import RunTracker, accelerator_tracking_args, new_run_name

log = logging.getLogger(__name__)

STATE_FILE, TRAINER_FILE = "training_state.pt", "trainer.json"
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


# --------------------------------------------------------------------------- pieces

def choose_precision(setting: str) -> str:
    """bf16 where the GPU supports it, fp16 (with loss scaling) on other GPUs, off on CPU."""
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def parameter_groups(model: ReportGenerator, tcfg: TrainConfig) -> list[dict]:
    """AdamW groups: encoder, decoder (pretrained or not), new parts (projection, grid/view
    embeddings, the decoder's cross-attention layers, which a pretrained GPT-2 lacks, and
    embeddings of new tokens); biases and norm weights (1-D tensors) without weight decay.
    Each group lists its parameters' names under ``param_names``."""
    token_embeddings = model.decoder.get_input_embeddings().weight
    decoder_is_new = model.config.pretrained_vocab_size == 0  # random init: every token is new
    lrs = {"encoder": tcfg.lr_encoder, "decoder": tcfg.lr_decoder, "new": tcfg.lr_new}
    buckets: dict[tuple[str, bool], list] = {(g, d): [] for g in lrs for d in (True, False)}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if name.startswith("encoder."):
            group = "encoder"
        elif (name.startswith("decoder.") and not (param is token_embeddings and decoder_is_new)
              and (tcfg.cross_attention_lr == "decoder"
                   or not any(part in name for part in CROSS_ATTENTION_PARTS))):
            group = "decoder"
        else:
            group = "new"
        buckets[(group, param.ndim >= 2)].append((name, param))
    return [{"params": [p for _, p in members], "param_names": [n for n, _ in members],
             "lr": lrs[group], "weight_decay": tcfg.weight_decay if decay else 0.0,
             "name": f"{group}{'' if decay else ' (no decay)'}"}
            for (group, decay), members in buckets.items() if members]


class NewTokenRows:
    """Gives the rows a pretrained GPT-2 did not have the ``new`` learning rate.

    The token embedding matrix is one tensor (tied to the output layer), so its
    pretrained rows train at the decoder's rate; after each optimizer step the
    new rows' update is rescaled by lr_new / lr_decoder, which for AdamW (update
    proportional to the learning rate, decay included) is exactly a step at lr_new.
    """

    def __init__(self, model: ReportGenerator, tcfg: TrainConfig):
        first_new = model.config.pretrained_vocab_size
        self.weight = model.decoder.get_input_embeddings().weight
        has_new_rows = 0 < first_new < self.weight.shape[0]
        self.active = has_new_rows and tcfg.lr_new != tcfg.lr_decoder
        if has_new_rows and not self.active:
            log.info("train.lr_new equals train.lr_decoder: the %d new token rows train at the "
                     "decoder's rate with the pretrained ones", self.weight.shape[0] - first_new)
        self.rows = slice(first_new, None)
        self.ratio = tcfg.lr_new / tcfg.lr_decoder
        self.before = None

    def before_step(self) -> None:
        if self.active:
            self.before = self.weight.data[self.rows].clone()

    @torch.no_grad()
    def after_step(self) -> None:
        if self.active:
            rows = self.weight.data[self.rows]
            rows.add_((rows - self.before) * (self.ratio - 1.0))


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (``train.label_smoothing`` applied) of a batch and the
    number of tokens it scored.

    A sum, not a mean: the loop divides it by the scored tokens of the whole accumulation
    window (every micro-batch, every process), so ``grad_accum`` micro-batches make the
    same gradient as one batch of their combined size, whatever their token counts.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    return loss, (labels != -100).sum()


def freeze_image_side(model: ReportGenerator, frozen: bool, head: bool = False) -> None:
    """``train.encoder_epochs``: after them the encoder stops training (no gradients, BatchNorm
    on its running statistics), and with ``head`` (``train.freeze_head``) the observation head
    too; the rest goes on from the cached features, at a fraction of an epoch's cost."""
    parts = [model.encoder, *([model.guidance.head] if head and model.guidance is not None else [])]
    for part in parts:
        for parameter in part.parameters():
            parameter.requires_grad_(not frozen)
    if frozen:
        model.encoder.eval()


def freeze_batchnorm(model: ReportGenerator) -> None:
    """Put the encoder's BatchNorm layers in eval mode (running statistics, no updates) while the
    rest trains: ``train.freeze_batchnorm``, for small batches or a pretrained encoder."""
    for module in model.encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


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


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, accelerator: Accelerator, model, optimizer, scheduler,
                    trainer_state: dict) -> None:
    """Write a resumable checkpoint atomically: a temporary folder, then a rename.

    Model (safetensors + config + tokenizer), optimizer, scheduler, loss scaler,
    every process's RNG states, epoch/step/best and the run config.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.staging")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    accelerator.wait_for_everyone()
    try:
        with write_errors_named(directory):
            (staging / f"rng_{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with write_errors_named(directory):
                accelerator.unwrap_model(model).write_files(staging)
                scaler = accelerator.scaler
                torch.save({"optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "scaler": scaler.state_dict() if scaler is not None else None},
                           staging / STATE_FILE)
                (staging / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=2))
            replace_dir(honour_umask(staging), directory)
    finally:
        if accelerator.is_main_process:  # gone after the swap; half-written after a failure
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()


def copy_checkpoint(source: Path, directory: Path, accelerator: Accelerator) -> None:
    """``directory`` becomes a copy of the checkpoint in ``source``, atomically; files are
    hard-linked where the file system allows (checkpoint files are never modified in place)."""
    if accelerator.is_main_process:
        staging = directory.with_name(f".{directory.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with write_errors_named(directory):
                shutil.copytree(source, staging, copy_function=_link_or_copy)
            replace_dir(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def load_checkpoint(directory: Path, accelerator: Accelerator, model, optimizer, scheduler) -> dict:
    """Restore what ``save_checkpoint`` wrote (tensors only: ``weights_only=True``)."""
    recover_dir(directory)
    trainer_path = directory / TRAINER_FILE
    if not trainer_path.exists():
        raise FileNotFoundError(f"no resumable checkpoint in {directory} (missing {TRAINER_FILE})")
    try:
        load_model(accelerator.unwrap_model(model), str(directory / "model.safetensors"), strict=True)
    except SafetensorError as exc:
        raise ValueError(f"checkpoint weights {directory / 'model.safetensors'} are not a readable "
                         f"safetensors file (truncated or corrupt): {exc}") from None
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"checkpoint {directory} does not fit the configured model "
                         f"(was model.* changed since it was written?): {first_load_error(exc)}") from None
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, corrupt file
        raise ValueError(f"cannot load {directory / STATE_FILE} safely: {exc}") from None
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng_path = directory / f"rng_{accelerator.process_index}.json"
    if rng_path.exists():
        _set_rng_state(read_json(rng_path))
    else:
        log.warning("no RNG state for process %d in %s; resumed run will not be bit-identical",
                    accelerator.process_index, directory)
    return read_json(trainer_path)


# --------------------------------------------------------------------------- loop

def train(cfg: Config, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train per ``cfg``; ``resume`` continues from ``checkpoints/last``.

    ``stop_after_epoch`` ends the session after that epoch as an interruption
    would (checkpoint written, no export), for time-boxed sessions and tests.
    One run per output folder: ``locks.FolderInUse`` names the process of a run already in it.
    """
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
            raise FolderInUse(refusal[0])
        yield


def _train(cfg: Config, accelerator: Accelerator, tracking: dict, resume: bool,
           stop_after_epoch: int | None, progress: bool) -> TrainResult:
    """``train``'s run, with the output folder locked."""
    tcfg = cfg.train
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    paths = cfg.paths
    last_dir, best_dir = paths.checkpoints / "last", paths.checkpoints / "best"
    history_path = paths.logs / "history.jsonl"

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

    steps_per_epoch = math.ceil(len(epoch_loader(0)) / tcfg.grad_accum)
    if tcfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                               patience=1)
    else:
        total = steps_per_epoch * tcfg.epochs
        scheduler = get_scheduler(tcfg.scheduler, optimizer, num_warmup_steps=int(tcfg.warmup_ratio * total),
                                  num_training_steps=total)

    fingerprint, fingerprint_payload = evaluation_fingerprint(cfg, [e.uid for e in val_data.examples])
    state = {"epoch": 0, "step": 0, "best_value": -math.inf, "best_epoch": 0, "bad_epochs": 0,
             "fingerprint": fingerprint, "fingerprint_payload": fingerprint_payload,
             "config": cfg.to_dict()}
    if resume:
        state = load_checkpoint(last_dir, accelerator, model, optimizer, scheduler)
        if state["fingerprint"] != fingerprint:
            log.warning("!" * 70 + "\nRESUMING WITH A CHANGED VALIDATION SETUP: fingerprint %s, run's %s.\n"
                        "Epochs from now on are flagged and never picked as best.\n" + "!" * 70,
                        fingerprint, state["fingerprint"])
        if accelerator.is_main_process:
            _truncate_history(history_path, state["epoch"])
        log.info("resumed from %s after epoch %d (step %d)", last_dir, state["epoch"], state["step"])
    # A fresh run leaves a previous run's files as they are until its first epoch is done
    # (an error or Ctrl-C before then loses nothing); then _take_over replaces them all.
    owns_folder = resume
    tracker = RunTracker(accelerator, tracking.get("log_with"))
    tracker.start(cfg, state.setdefault("run_name", new_run_name(cfg)), fingerprint, state["step"])

    stopped, last_epoch = "max epochs", tcfg.epochs
    if state["bad_epochs"] >= tcfg.patience:  # a resumed run that had already stopped early
        stopped, last_epoch = _early_stopping(tcfg.patience), state["epoch"]
        log.info("the run stopped early after epoch %d (%s); nothing left to train",
                 state["epoch"], stopped)
    train_features = val_features = None  # the frozen encoder's, once it is frozen
    for epoch in range(state["epoch"] + 1, last_epoch + 1):
        began = time.perf_counter()
        frozen = bool(tcfg.encoder_epochs) and epoch > tcfg.encoder_epochs
        if frozen and val_features is None:
            unwrapped = accelerator.unwrap_model(model)
            freeze_image_side(unwrapped, True, tcfg.freeze_head)
            if not cfg.images.augment:  # augmented images give other features every epoch
                train_features = FrozenFeatures(unwrapped, train_data, collate_fn, accelerator.device)
            val_features = FrozenFeatures(unwrapped, val_data, collate_fn, accelerator.device)
        train_loss, samples, state["step"] = _train_epoch(
            accelerator, model, optimizer, scheduler, epoch_loader(epoch), new_token_rows, tcfg,
            epoch, state["step"], progress, loss_hook, tracker, frozen, train_features)
        seconds_train = time.perf_counter() - began
        _sync_buffers(accelerator, model)
        metrics, val_loss, val_rows = _validate(accelerator, model, val_data, collate_fn, cfg, progress,
                                                val_features, val_targets)
        value = selection_value(metrics, tcfg.selection_metric)
        if tcfg.scheduler == "plateau":
            scheduler.step(value)
        fingerprint_ok = fingerprint == state["fingerprint"]
        improved = fingerprint_ok and value > state["best_value"]
        record = {"epoch": epoch, "step": state["step"], "train_loss": train_loss, "val_loss": val_loss,
                  "val": {k: metrics[k] for k in HISTORY_METRICS if k in metrics},
                  "val_distinct_predictions": metrics["distinct_predictions"],
                  "selection_metric": tcfg.selection_metric, "selection_value": value,
                  "learning_rates": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "seconds": time.perf_counter() - began,
                  "samples_per_s": samples * accelerator.num_processes / seconds_train,
                  "fingerprint": fingerprint, "fingerprint_ok": fingerprint_ok, "best": improved}
        if not fingerprint_ok:
            log.warning("epoch %d: evaluation fingerprint %s differs from the run's %s; "
                        "flagged, not eligible as best", epoch, fingerprint, state["fingerprint"])
        tracker.epoch(state["step"], epoch, metrics, val_loss, train_loss, fingerprint, fingerprint_ok,
                      val_rows)
        if improved:
            state.update(best_value=value, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        if accelerator.is_main_process and not owns_folder:
            _take_over(cfg, record)
        elif accelerator.is_main_process:  # before the checkpoint: a resume drops lines past it
            with history_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        owns_folder = True
        if improved:  # best first (a crash in between re-trains this epoch), then last as its copy
            save_checkpoint(best_dir, accelerator, model, optimizer, scheduler, state)
            copy_checkpoint(best_dir, last_dir, accelerator)
        else:
            save_checkpoint(last_dir, accelerator, model, optimizer, scheduler, state)
        progress_log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f%s", epoch, tcfg.epochs,
                          train_loss, val_loss, tcfg.selection_metric, value, " (best)" if improved else "")
        if state["bad_epochs"] >= tcfg.patience:
            stopped = _early_stopping(tcfg.patience)
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            tracker.finish()
            return TrainResult(state["best_epoch"], state["best_value"], 0, epoch, "interrupted",
                               paths.models / "final", history_path)

    final = paths.models / "final"
    if state["best_epoch"] == 0:  # the same on every process: all raise, none waits below
        raise RuntimeError("no epoch had the run's evaluation fingerprint; nothing to export")
    exported = state["best_epoch"]
    if tcfg.export == "last":  # unless the last epoch was validated with other settings
        exported = state["epoch"] if fingerprint == state["fingerprint"] else state["best_epoch"]
        if exported != state["epoch"]:
            log.warning("train.export last: epoch %d was validated with other settings than the run's; "
                        "exporting the best epoch on val (%d) instead", state["epoch"], exported)
    if accelerator.is_main_process:
        # with the thresholds its val score used
        model_out = ReportGenerator.from_pretrained(last_dir if exported == state["epoch"] else best_dir)
        if model_out.config.guidance_thresholds:
            log.info("observation thresholds chosen on val: %s",
                     dict(zip(labels, model_out.config.guidance_thresholds)))
        record = [h for h in _history_records(history_path) if h["epoch"] == exported][-1]
        model_out.save_pretrained(final, extra_files={
            "run_config.json": json.dumps(cfg.to_dict(), indent=2),
            CARD_FILE: export_card_text(cfg, model_out, record)})
    accelerator.wait_for_everyone()
    tracker.finish()
    log.info("best epoch on val %d (%s %.4f); %s; epoch %d (train.export %s) exported to %s",
             state["best_epoch"], tcfg.selection_metric, state["best_value"], stopped, exported,
             tcfg.export, final)
    return TrainResult(state["best_epoch"], state["best_value"], exported, state["epoch"], stopped,
                       final, history_path)


def mark_epochs(ax, history: list[dict], model_dir: Path | None) -> None:
    """Dashed line at the best epoch on val; dotted at the one exported to ``model_dir`` (as its
    model card says) where that is another."""
    from medexgen_lib.model_card import exported_epoch

    best = [h["epoch"] for h in history if h["best"]]
    if best:
        ax.axvline(best[-1], color="black", ls="--", label=f"best on val (epoch {best[-1]})")
    exported = exported_epoch(model_dir) if model_dir is not None else None
    if exported is not None and exported not in best[-1:]:
        ax.axvline(exported, color="black", ls=":", label=f"exported (epoch {exported})")


def selection_value(metrics: dict, selection_metric: str) -> float:
    """``train.selection_metric`` of the val metrics: one metric's name, or several joined by
    " + " (their sum, e.g. "clinical macro_F1 + BLEU-4" for reports both right and well worded)."""
    names = [name.strip() for name in selection_metric.split(" + ")]
    unknown = [name for name in names if name not in metrics]
    if unknown:
        raise KeyError(f"train.selection_metric names {unknown}, not a validation metric; "
                       f"known: {sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
    return float(sum(metrics[name] for name in names))


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


@torch.no_grad()
def _validate(accelerator, model, val_data, collate_fn, cfg, progress, features=None, targets=None
              ) -> tuple[dict, float, list[dict]]:
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


def _take_over(cfg: Config, record: dict) -> None:
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


def _truncate_history(path: Path, last_epoch: int) -> None:
    """Drop history lines after the checkpoint's epoch (a kill may have left some)."""
    if not path.exists():
        return
    kept = [record for record in _history_records(path) if record["epoch"] <= last_epoch]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def device_report(cfg: Config) -> dict:
    """What a run would use here: device, precision, processes, effective batch size."""
    import accelerate

    state = accelerate.PartialState(cpu=not torch.cuda.is_available())  # as train() will see it
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return {"device": device, "processes": state.num_processes,
            "precision": choose_precision(cfg.train.precision),
            "effective_batch": cfg.train.batch_size * cfg.train.grad_accum * state.num_processes,
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}


def load_history(path: Path) -> list[dict]:
    """The epochs of ``logs/history.jsonl``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run notebook 04_training first")
    return _history_records(path)


def _history_records(path: Path) -> list[dict]:
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
