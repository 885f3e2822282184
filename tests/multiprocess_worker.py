"""Run by test_multiprocess.py under ``accelerate launch``: a tiny training run that records,
per process, every file write, a digest of the weights after each epoch, and what it read of
the image cache's shards while training (studies and image ids per epoch, shards it mapped).

Mode ``never-best`` (4th argument): validation never scores, so no epoch is eligible as best;
each process records the "nothing to export" error it raised. Mode ``in-use``: another process
holds the output folder; each process records the refusal it raised."""

import hashlib
import os
import json
import sys
from pathlib import Path

import torch

import medexgen_lib.train as train_module
from medexgen_lib.config import Config, load_config
from medexgen_lib.dataset import ReportDataset
from medexgen_lib.images import ImageCache
from medexgen_lib.model import ReportGenerator

data_dir, out_dir, record_dir = sys.argv[1:4]
mode = sys.argv[4] if len(sys.argv) > 4 else "train"
rank = int(os.environ["RANK"])  # set by the launcher; PartialState here would fix its settings early
writes = []


def recording(original, describe):
    def wrapper(*args, **kwargs):
        writes.append(describe(*args, **kwargs))
        return original(*args, **kwargs)
    return wrapper


Path.write_text = recording(Path.write_text, lambda self, *a, **k: str(self))
_open = Path.open
Path.open = lambda self, mode="r", *a, **k: (writes.append(str(self)) if set(mode) & set("wa") else None) or _open(self, mode, *a, **k)
torch.save = recording(torch.save, lambda obj, f, *a, **k: str(f))
ReportGenerator.write_files = recording(ReportGenerator.write_files, lambda self, d: f"{d}/<model files>")
Config.save = recording(Config.save, lambda self, p: str(p))

_save_checkpoint = train_module.save_checkpoint


def save_and_fingerprint(directory, accelerator, model, optimizer, scheduler, state):
    weights = accelerator.unwrap_model(model).state_dict()
    digest = hashlib.sha256(b"".join(weights[k].cpu().numpy().tobytes() for k in sorted(weights)))
    digests = Path(record_dir) / f"digest_rank{rank}.jsonl"
    with _open(digests, "a") as handle:
        handle.write(json.dumps({"epoch": state["epoch"], "dir": directory.name,
                                 "digest": digest.hexdigest()}) + "\n")
    return _save_checkpoint(directory, accelerator, model, optimizer, scheduler, state)


train_module.save_checkpoint = save_and_fingerprint

# Reads of the training split while an epoch trains: studies fetched, cache images read.
reads = {"epoch": None, "studies": {}, "images": {}}
_train_epoch, _load_split = train_module._train_epoch, train_module.load_split
_getitem, _get = ReportDataset.__getitem__, ImageCache.get
datasets = {}


def training_epoch(*args, **kwargs):
    reads["epoch"] = args[7]  # _train_epoch(accelerator, ..., tcfg, epoch, ...)
    try:
        return _train_epoch(*args, **kwargs)
    finally:
        reads["epoch"] = None


def getitem(self, index):
    if reads["epoch"] is not None and self is datasets.get("train"):
        reads["studies"].setdefault(reads["epoch"], []).append(self.examples[index].uid)
    return _getitem(self, index)


def get(self, image_id):
    if reads["epoch"] is not None and self is datasets["train"].cache:
        reads["images"].setdefault(reads["epoch"], []).append(image_id)
    return _get(self, image_id)


def load_split(cfg, split, *args, **kwargs):
    datasets[split] = _load_split(cfg, split, *args, **kwargs)
    return datasets[split]


train_module._train_epoch, train_module.load_split = training_epoch, load_split
ReportDataset.__getitem__, ImageCache.get = getitem, get
cfg = load_config("demo", {
    "paths.data_dir": data_dir, "paths.output_dir": out_dir, "images.size": 32, "model.n_layer": 1,
    "model.n_head": 2, "model.n_embd": 32, "train.epochs": 2, "train.batch_size": 4,
    "eval.max_new_tokens": 6, "text.max_length": 48, "tokenizer.vocab_size": 400})
if mode == "never-best":
    train_module.validate = lambda *args, **kwargs: (
        {"clinical macro_F1": float("-inf"), "BLEU-4": 0.0, "distinct_predictions": 0}, 1.0, [])
    cfg.train.epochs = 1
    try:
        train_module.train(cfg, progress=False)
    except RuntimeError as exc:
        (Path(record_dir) / f"raised_rank{rank}.txt").write_text(str(exc))
    sys.exit(0)
if mode == "in-use":  # another process holds the output folder's lock
    from medexgen_lib.locks import FolderInUse
    try:
        train_module.train(cfg, progress=False)
    except FolderInUse as exc:
        (Path(record_dir) / f"raised_rank{rank}.txt").write_text(str(exc))
    sys.exit(0)
train_module.train(cfg, progress=False)
with _open(Path(record_dir) / f"writes_rank{rank}.json", "w") as handle:
    json.dump(writes, handle)
train = datasets["train"]
with _open(Path(record_dir) / f"reads_rank{rank}.json", "w") as handle:
    json.dump({"studies": reads["studies"], "images": reads["images"],
               "views": {e.uid: e.image_ids for e in train.examples},
               "location": train.cache.location, "opened_shards": train.cache.opened_shards(),
               "shards": len(train.cache.shard_files)}, handle)
