"""Run by test_train.py in a child process to inject a real fault into training.

    python fault_worker.py SETTINGS_JSON MODE [ARG]

SETTINGS_JSON: config overrides for the demo profile. MODE:
  train                   train (resuming if checkpoints/last exists), no fault
  kill-at-step N          SIGKILL this process at the N-th training forward pass
  kill-in-save EPOCH      SIGKILL while checkpoints/last of EPOCH is half written
  kill-between-renames EPOCH
                          SIGKILL after the old checkpoints/last was moved aside,
                          before the new one took its place
  export                  export checkpoints/best to models/final (run it with
                          the conftest's full_disk to see a disk filling up)
"""

import json
import os
import signal
import sys
from pathlib import Path

import medexgen_lib.checkpoints as checkpoints_module
import medexgen_lib.model as model_module
import medexgen_lib.train as train_module
from medexgen_lib.config import load_config
from medexgen_lib.model import ReportGenerator


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


settings, mode, arg = json.loads(sys.argv[1]), sys.argv[2], (sys.argv[3:] or ["0"])[0]
cfg = load_config("demo", settings)
last = cfg.paths.checkpoints / "last"

if mode == "kill-at-step":
    forward, calls = ReportGenerator.forward, [0]

    def counting_forward(self, *args, **kwargs):
        if self.training:
            calls[0] += 1
            if calls[0] == int(arg):
                die()
        return forward(self, *args, **kwargs)
    ReportGenerator.forward = counting_forward

elif mode in ("kill-in-save", "kill-between-renames"):
    # checkpoints/last is written by save_checkpoint, or, after an epoch that improved, as a
    # (hard-linked) copy of checkpoints/best by copy_checkpoint: both are armed.
    save, copy = train_module.save_checkpoint, train_module.copy_checkpoint

    def arm() -> None:
        if mode == "kill-in-save":
            def half_write(self, folder):
                (folder / "model.safetensors").write_bytes(b"half a file")
                die()

            def half_copy(source, target):
                Path(target).write_bytes(b"half a file")
                die()
            ReportGenerator.write_files = half_write
            checkpoints_module._link_or_copy = half_copy
        else:
            replace = os.replace

            def dying_replace(src, dst):
                replace(src, dst)
                if Path(dst).name == ".last.old":
                    die()
            model_module.os.replace = dying_replace

    def dying_save(directory, accelerator, model, optimizer, scheduler, state):
        if directory.name == "last" and state["epoch"] == int(arg):
            arm()
        return save(directory, accelerator, model, optimizer, scheduler, state)

    def dying_copy(source, directory, accelerator):
        if directory.name == "last" and json.loads((source / "trainer.json").read_text())["epoch"] == int(arg):
            arm()
        return copy(source, directory, accelerator)
    train_module.save_checkpoint, train_module.copy_checkpoint = dying_save, dying_copy

if mode == "export":
    model = ReportGenerator.from_pretrained(cfg.paths.checkpoints / "best")
    try:
        model.save_pretrained(cfg.paths.models / "final")
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
else:
    train_module.train(cfg, resume=last.exists() or (last.parent / ".last.old").exists(), progress=False)
