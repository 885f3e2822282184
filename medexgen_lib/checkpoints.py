"""Resumable training checkpoints: model, optimizer, scheduler, loss scaler, every process's RNG
state and the trainer's state, written atomically (a staging folder, then a rename)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_model

from medexgen_lib.files import honour_umask, read_json, recover_dir, replace_dir
from medexgen_lib.model import first_load_error, write_errors_named

log = logging.getLogger(__name__)

STATE_FILE, TRAINER_FILE = "training_state.pt", "trainer.json"


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: Path, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: object, trainer_state: dict) -> None:
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
            (staging / f"rng_{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
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


def load_checkpoint(directory: Path, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: object) -> dict:
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
        set_rng_state(read_json(rng_path))
    else:
        log.warning("no RNG state for process %d in %s; resumed run will not be bit-identical",
                    accelerator.process_index, directory)
    return read_json(trainer_path)
