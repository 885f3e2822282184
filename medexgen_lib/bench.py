"""Benchmarks: ``python -m medexgen_lib.bench [--quick] [--name NAME]``; ``--name scale
[--sizes N ...]`` is the data path at scale (stages 01-03, cache, loaders; ``bench_scale``).

Each comparison runs side by side in the same process, repeated; medians are
reported. Prints a table and writes ``IUXRAY_OUTPUT_PIPELINE/logs/bench/<name>.json``
with the machine described. Targets (from the benchmark issue) are printed next
to the figures; a missed target is reported, not hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medexgen_lib.config import ConfigError, load_config
from medexgen_lib.files import write_json
from medexgen_lib.images import ImageCache, load_image, normalize
from medexgen_lib.paths import PROJECT_ROOT

SAMPLE_IMAGES = PROJECT_ROOT / "tests" / "data" / "iuxray-sample" / "images"


def machine() -> dict:
    """CPU, cores, GPU and library versions of this machine."""
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak resident memory)
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- 1. images

def _synthetic_pngs(folder: Path, n: int, size: int, sixteen_bit: bool, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    files = []
    for k in range(n):
        base = np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) * 4) + 0.1 * rng.random((size, size))
        if sixteen_bit:
            image = Image.fromarray((base / base.max() * 4095).astype(np.uint16))  # 12-bit data in 16
        else:
            image = Image.fromarray((base / base.max() * 255).astype(np.uint8))
        path = folder / f"img{size}_{k}.png"
        image.save(path)
        files.append((f"IM{k}", str(path)))
    return files


def _training_dataset(files: list[tuple[str, str]], cache: ImageCache, augment: bool):
    """A ``ReportDataset`` over ``files`` as training builds it: studies of two consecutive
    files (frontal, lateral) in ``files`` order, which is not the cache's row order (by id)."""
    import pandas as pd

    from medexgen_lib.dataset import ReportDataset
    from medexgen_lib.tokenizer import train_tokenizer

    pairs = [files[k:k + 2] for k in range(0, len(files), 2)]
    studies = pd.DataFrame({"uid": [f"CXR{k}" for k in range(len(pairs))],
                            "image_ids": [[i for i, _ in pair] for pair in pairs],
                            "projections": [["frontal", "lateral"][:len(pair)] for pair in pairs]})
    texts = pd.Series(["Heart size normal. No effusion."] * len(pairs), index=studies.index)
    tokenizer = train_tokenizer(texts.tolist() * 5, 300)
    return ReportDataset(studies, texts, cache, tokenizer, 16, augment=augment), tokenizer


def augmentation_cost(size: int, repeats: int, views: int = 64) -> dict:
    """Milliseconds per view: torchvision's transform view by view (``images.train_augmentation``)
    vs ``dataset.augment_views`` on a study's two views at once, as ``__getitem__`` calls it."""
    from medexgen_lib.dataset import augment_views
    from medexgen_lib.images import train_augmentation

    pixels = torch.randint(0, 256, (views // 2, 2, size, size), dtype=torch.uint8)
    transform = train_augmentation()
    per_view = _median_time(lambda: [transform(v.unsqueeze(0)) for v in pixels.flatten(0, 1)], repeats)
    batched = _median_time(lambda: [augment_views(study) for study in pixels], repeats)
    return {"image_size": size, "torchvision_per_view_ms": 1e3 * per_view / views,
            "augment_views_ms": 1e3 * batched / views, "speedup": per_view / batched}


def bench_images(quick: bool, repeats: int, num_workers: int = 0) -> dict:
    """Per-epoch loading to normalised float tensors: per-file decode + resize, a raw read of
    contiguous cache rows, and what training sees (``ReportDataset`` through a ``DataLoader``
    with ``collate``, augmentation off and on). The decode, the cache and the loader must give
    equal tensors for the same images, or the benchmark stops."""
    from torch.utils.data import DataLoader

    from medexgen_lib.dataset import collate

    target_size, batch = 224, 32
    sets = {"512": (512, False, 64 if quick else 256), "2048": (2048, True, 8 if quick else 48)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = {name: _synthetic_pngs(tmp, n, size, deep) for name, (size, deep, n) in sets.items()}
        if SAMPLE_IMAGES.is_dir():
            inputs["shared_real"] = [(p.stem, str(p)) for p in sorted(SAMPLE_IMAGES.glob("*.png"))]
        for name, files in inputs.items():
            files = files[::-1]  # not in id order, as a split's studies are not
            cache = ImageCache.build(files, target_size, tmp / "cache", max_pixels=10**9)
            loaders = {}
            for augment in (False, True):
                dataset, tokenizer = _training_dataset(files, cache, augment)
                loaders[augment] = DataLoader(dataset, batch_size=batch // 2, shuffle=False,
                                              num_workers=num_workers,
                                              collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
            path_of = dict(files)
            order = [i for example in loaders[False].dataset.examples for i in example.image_ids]
            seen = torch.cat([b["images"] for b in loaders[False]]).flatten(0, 1)
            from_cache = normalize(torch.from_numpy(np.stack([cache.get(i) for i in order])))
            decoded = normalize(torch.stack([torch.from_numpy(load_image(path_of[i], target_size).copy())
                                             for i in order]))
            identical = torch.equal(seen, from_cache) and torch.equal(from_cache, decoded)
            if not identical:
                raise AssertionError(f"{name}: the training loader, the cache and per-file decoding gave "
                                     "different tensors for the same images")

            def naive():
                for start in range(0, len(files), batch):
                    chunk = files[start:start + batch]
                    normalize(torch.stack([torch.from_numpy(load_image(p, target_size).copy()) for _, p in chunk]))

            def cached():
                for number in range(len(cache.shard_files)):
                    shard = cache.shard(number)
                    for start in range(0, len(shard), batch):
                        normalize(torch.from_numpy(np.array(shard[start:start + batch])))

            times = {"naive": _median_time(naive, repeats), "cached": _median_time(cached, repeats)}
            for augment, loader in loaders.items():
                times["augmented" if augment else "training"] = _median_time(lambda: [b for b in loader], repeats)
            n_views = len(order)
            results[name] = {"images": len(files), "identical_outputs": identical,
                             "naive_images_per_s": len(files) / times["naive"],
                             "cached_images_per_s": len(files) / times["cached"],
                             "training_images_per_s": n_views / times["training"],
                             "training_augmented_images_per_s": n_views / times["augmented"],
                             "speedup": times["naive"] / times["cached"],
                             "training_speedup": (n_views / times["training"]) / (len(files) / times["naive"]),
                             "training_augmented_speedup":
                                 (n_views / times["augmented"]) / (len(files) / times["naive"])}
    return results


# --------------------------------------------------------------------------- 2. generation

@torch.no_grad()
def bench_generation(quick: bool, repeats: int) -> dict:
    """transformers' generate with the KV cache vs re-running the whole prefix per token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    layers, width, heads = (2, 256, 4) if quick else (12, 768, 12)  # GPT-2 small in the full run
    new_tokens, batch, visual_tokens = (20, 4, 32) if quick else (60, 16, 98)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=50_300, n_positions=128,
                        add_cross_attention=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    decoder = GPT2LMHeadModel(config).eval()
    visual = torch.randn(batch, visual_tokens, width)
    start = torch.zeros(batch, 1, dtype=torch.long)
    kwargs = {"encoder_hidden_states": visual, "attention_mask": torch.ones_like(start), "do_sample": False,
              "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "eos_token_id": 1, "pad_token_id": 2}
    outputs = {}

    def cached():
        outputs["cached"] = decoder.generate(start, num_beams=1, **kwargs)

    def naive():
        ids = start
        for _ in range(new_tokens):
            logits = decoder(input_ids=ids, encoder_hidden_states=visual, use_cache=False).logits[:, -1]
            logits[:, config.eos_token_id] = -float("inf")  # as min_new_tokens does
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        outputs["naive"] = ids

    def beam():
        decoder.generate(start, num_beams=3, **kwargs)

    cached_s, naive_s = _median_time(cached, repeats), _median_time(naive, max(1, repeats - 1))
    beam_s = _median_time(beam, repeats)
    identical = torch.equal(outputs["cached"], outputs["naive"])
    if not identical:
        raise AssertionError("generate() with the KV cache and the naive loop produced different tokens")
    tokens = batch * new_tokens
    return {"decoder": f"{layers} layers x {width}", "batch": batch, "new_tokens": new_tokens,
            "identical_outputs": identical, "cached_tokens_per_s": tokens / cached_s,
            "naive_tokens_per_s": tokens / naive_s, "speedup": naive_s / cached_s,
            "beam3_over_greedy_time": beam_s / cached_s}


# --------------------------------------------------------------------------- 3. training

def bench_training(quick: bool, repeats: int) -> dict:
    """Training samples/s and peak memory (CPU: resident set) for the demo and full-size shapes."""
    from medexgen_lib.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["No pleural effusion or pneumothorax. Heart size is normal."] * 50, 500)
    shapes = {"demo": (load_config("demo").model, load_config("demo").images.size, 16)}
    if not quick:
        full = load_config("full").model
        full.encoder_pretrained = full.decoder_pretrained = False  # shapes only; random weights
        shapes["full (ResNet50 + GPT-2 small, 224 px)"] = (full, 224, 4)
    return {name: training_step_rate(model_cfg, size, batch, repeats, tokenizer)
            for name, (model_cfg, size, batch) in shapes.items()}


def training_step_rate(model_cfg, size: int, batch: int, repeats: int, tokenizer) -> dict:
    """Samples/s of one optimizer step (forward, backward, AdamW) of a model of ``model_cfg`` on
    random ``size`` px views, and the peak resident memory while it runs."""
    from medexgen_lib.model import ReportGenerator

    torch.manual_seed(0)
    model = ReportGenerator.build(model_cfg, tokenizer, size, 96).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 2, 3, size, size)
    ids = torch.randint(3, len(tokenizer), (batch, 60))

    def step():
        loss = model(images, ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up (allocations, optimizer state)
    _peak_rss_reset()
    seconds = _median_time(step, repeats)
    return {"batch": batch, "image_size": size, "samples_per_s": batch / seconds,
            "peak_rss_mb": _peak_rss_mb(), "parameters": model.parameter_summary()["total"]}


# Dense (no sparsity) peak TFLOP/s per math mode, for MFU (vendor datasheets, SXM parts).
PEAK_TFLOPS = {"H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
               "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
               "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}
# What each benchmark mode computes in; "fp32" turns TF32 off so that it is fp32 indeed.
GPU_MODES = {"fp32": "fp32 (TF32 off)", "tf32": "fp32 storage, TF32 matmuls and convolutions",
             "bf16": "bf16 autocast (TF32 off for what stays fp32)",
             "bf16 + channels_last": "bf16 autocast, channels_last encoder (TF32 off)"}


def peak_tflops(gpu: str, mode: str) -> float | None:
    """The datasheet peak matching ``mode``'s math (fp32, TF32 or bf16) for ``gpu``; None if unknown."""
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    return peaks["bf16" if mode.startswith("bf16") else mode] if peaks else None


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on or off inside the block, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def training_step_flops(model, images: torch.Tensor, ids: torch.Tensor) -> int:
    """FLOPs of one forward + backward pass, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(images, ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_accelerated_training(quick: bool, steps: int = 20) -> dict:
    """fp32 (TF32 off) vs TF32 vs bf16 autocast vs bf16 + channels_last for the full-size model
    (ResNet50 + GPT-2 small shape, random init, synthetic 224 px inputs): samples/s, peak memory,
    MFU against the peak of the mode's own math (``peak_tflops``).

    Meant for a GPU; on CPU (``quick``) it runs tiny shapes to exercise the code path.
    """
    from medexgen_lib.model import ReportGenerator
    from medexgen_lib.tokenizer import train_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = train_tokenizer(["No pleural effusion or pneumothorax. Heart size is normal."] * 50, 500)
    model_cfg = load_config("full").model
    model_cfg.encoder_pretrained = model_cfg.decoder_pretrained = False
    size, batch = 224, 32
    if quick:
        model_cfg = load_config("demo").model
        size, batch, steps = 64, 4, 1
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else ""
    results = {}
    for mode in GPU_MODES:
        torch.manual_seed(0)
        model = ReportGenerator.build(model_cfg, tokenizer, size, 96).to(device).train()
        images = torch.randn(batch, 2, 3, size, size, device=device)
        if "channels_last" in mode:
            model.encoder.to(memory_format=torch.channels_last)
        ids = torch.randint(3, len(tokenizer), (batch, 60), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32

        def step():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                flat = images.flatten(0, 1)
                if "channels_last" in mode:
                    flat = flat.contiguous(memory_format=torch.channels_last)
                loss = model(flat.view_as(images), ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        flops = training_step_flops(model, images, ids)
        with tf32(mode == "tf32"):
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            for _ in range(steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - began) / steps
        achieved = flops / seconds / 1e12
        peak = peak_tflops(gpu, mode)
        results[mode] = {"math": GPU_MODES[mode], "batch": batch, "samples_per_s": batch / seconds,
                         "tflops": achieved, "peak_tflops": peak,
                         "mfu": achieved / peak if peak else None,
                         "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
                         "flops_per_step": flops}
    results["device"] = gpu or "cpu"
    results["bf16_speedup_over_fp32"] = results["bf16"]["samples_per_s"] / results["fp32"]["samples_per_s"]
    results["tf32_speedup_over_fp32"] = results["tf32"]["samples_per_s"] / results["fp32"]["samples_per_s"]
    if device == "cuda":
        results["augmentation"] = gpu_augmentation_cost()
    return results


def gpu_augmentation_cost(views: int = 64, size: int = 224, repeats: int = 5) -> dict:
    """``dataset.augment_views`` on a whole batch of views already on the GPU: ms per view."""
    from medexgen_lib.dataset import augment_views

    pixels = torch.randint(0, 256, (views, size, size), dtype=torch.uint8, device="cuda")

    def run_once():
        augment_views(pixels)
        torch.cuda.synchronize()

    run_once()
    return {"views": views, "image_size": size, "ms_per_view": 1e3 * _median_time(run_once, repeats) / views}


# --------------------------------------------------------------------------- 4. end to end

def bench_end_to_end() -> dict:
    """Wall time of the demo pipeline, stage by stage, in a temporary folder."""
    from medexgen_lib.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        results = run_pipeline("demo", {"paths.data_dir": f"{tmp}/data", "paths.output_dir": f"{tmp}/out"})
    stages = {f"{r.stage} {r.notebook}": r.seconds for r in results}
    return {"stages": stages, "total_s": sum(stages.values())}


# --------------------------------------------------------------------------- 5. scale

SCALE_SIZES = (2_000, 20_000)
SCALE_IMAGE_SIZE = 64
SCALE_LOADER_SAMPLES = 4_096  # training samples each loader delivers (the whole split if smaller)
SCALE_CHECKED_BATCHES = 8  # batches compared tensor by tensor between the 0- and 2-worker loaders
SCALE_WITHIN = 1.2  # the largest size's per-study time and peak RSS, at most this x the smallest's
STAGES = ("01", "02", "03")

# Stages 01-03 as their notebooks run them (outputs not displayed), in one fresh process per data
# set, so that its peak resident memory is the stages' own; the peak is reset before each stage.
_STAGES_CHILD = """
import json, sys, time
from medexgen_lib.bench import STAGES, _peak_rss_mb, _peak_rss_reset, run_stage
from medexgen_lib.config import load_config
overrides, result = json.loads(sys.argv[1]), sys.argv[2]
cfg = load_config("demo", overrides)
stages = {}
for stage in STAGES:
    _peak_rss_reset()
    began = time.perf_counter()
    run_stage(stage, cfg)
    stages[stage] = {"seconds": time.perf_counter() - began, "peak_rss_mb": _peak_rss_mb()}
with open(result, "w") as handle:
    json.dump(stages, handle)
"""


def _build_phantom(out: Path, studies: int, size: int) -> dict[str, str]:
    """Write a MIMIC-CXR-JPG-layout phantom of ``studies`` studies at ``size`` px into ``out``
    (``phantom_layouts.write_phantom``); the config overrides that make stage 01 read it."""
    from medexgen_lib.phantom_layouts import write_phantom

    write_phantom(out, "mimic", studies, size, seed=0)
    return {"data.source": "mimic"}


def run_stage(stage: str, cfg) -> None:
    """Stage ``stage`` ("01", "02" or "03") as its notebook's cells run it, without displays."""
    from medexgen_lib.reports import load_studies_table

    if stage == "01":
        from medexgen_lib.acquisition import acquire, build_studies_table
        build_studies_table(cfg, acquire(cfg))
    elif stage == "02":
        from medexgen_lib.eda import run_eda
        run_eda(load_studies_table(cfg.paths.studies_table), cfg.paths.plots,
                cfg.paths.logs / "eda_stats.json", cfg.text.target, cfg.text.lowercase)
    else:
        from medexgen_lib.preprocess import load_split, run_preprocessing, token_lengths
        run_preprocessing(cfg)
        token_lengths(cfg)
        for split in ("train", "val", "test"):
            load_split(cfg, split)


def _run_stages_child(overrides: dict, result: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", _STAGES_CHILD, json.dumps(overrides), str(result)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError("stages 01-03 of the scale benchmark failed: "
                           f"{(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(result.read_text())


def _folder_mb(folder: Path, leave_out: Path | None = None) -> float:
    """MB of the files under ``folder`` (those under ``leave_out`` not counted)."""
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and (leave_out is None or leave_out not in p.parents)) / 2**20


def loader_rates(cfg, samples: int, workers: tuple[int, ...] = (0, 2)) -> dict:
    """Training samples/s of the training split's ``ReportDataset`` through a DataLoader with
    each number of ``workers`` (batches and collate as training has them, in a shuffled order),
    worker start-up included; and whether every loader delivered the same samples: the same
    studies in the same order, the first batches equal tensor by tensor."""
    from medexgen_lib.dataset import collate
    from medexgen_lib.preprocess import load_split
    from medexgen_lib.tokenizer import load_tokenizer
    from torch.utils.data import DataLoader, Subset

    data = load_split(cfg, "train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:samples].tolist()
    pad = load_tokenizer(cfg.paths.processed / "tokenizer").pad_token_id

    def loader(n: int) -> DataLoader:
        return DataLoader(Subset(data, order), batch_size=cfg.train.batch_size, num_workers=n,
                          collate_fn=partial(collate, pad_token_id=pad))

    rates, uids, checked = {}, {}, {}
    for n in workers:
        began = time.perf_counter()
        uids[n] = [uid for batch in loader(n) for uid in batch["uids"]]
        rates[str(n)] = len(order) / (time.perf_counter() - began)
        checked[n] = [batch["images"] for batch, _ in zip(loader(n), range(SCALE_CHECKED_BATCHES))]
    first = workers[0]
    same = all(uids[n] == uids[first] and len(checked[n]) == len(checked[first])
               and all(torch.equal(a, b) for a, b in zip(checked[n], checked[first])) for n in workers)
    return {"samples": len(order), "samples_per_s": rates, "same_samples": same}


def bench_scale(sizes: tuple[int, ...] = SCALE_SIZES, image_size: int = SCALE_IMAGE_SIZE,
                repeats: int = 3) -> dict:
    """Stages 01-03 on phantoms of each number of studies (in a child process per size):
    seconds per 1,000 studies, peak RSS, the cache on disk; DataLoader samples/s with 0 and 2
    workers beside what one training step of the demo model consumes."""
    from medexgen_lib.reports import load_studies_table
    from medexgen_lib.tokenizer import train_tokenizer

    demo = load_config("demo")
    tokenizer = train_tokenizer(["No pleural effusion or pneumothorax. Heart size is normal."] * 50, 500)
    step = training_step_rate(demo.model, image_size, demo.train.batch_size, repeats, tokenizer)
    results = {}
    for studies in sizes:
        with tempfile.TemporaryDirectory(prefix=f"medexgen-scale-{studies}-") as tmp:
            data, out = Path(tmp) / "data", Path(tmp) / "output"
            began = time.perf_counter()
            overrides = _build_phantom(data, studies, image_size)
            phantom_s = time.perf_counter() - began
            overrides.update({"paths.data_dir": str(data), "paths.output_dir": str(out),
                              "images.size": image_size})
            stages = _run_stages_child(overrides, Path(tmp) / "stages.json")
            cfg = load_config("demo", overrides)
            summary = json.loads((cfg.paths.processed / "preprocessing.json").read_text())
            table = load_studies_table(cfg.paths.studies_table)
            cache = Path(summary["image_cache"])
            results[str(studies)] = {
                "studies": studies, "images": summary["images_cached"],
                "phantom_s_per_1000": 1000 * phantom_s / studies,
                "stage_s_per_1000": {s: 1000 * r["seconds"] / studies for s, r in stages.items()},
                "stages_s_per_1000": 1000 * sum(r["seconds"] for r in stages.values()) / studies,
                "stage_peak_rss_mb": {s: r["peak_rss_mb"] for s, r in stages.items()},
                "peak_rss_mb": max(r["peak_rss_mb"] for r in stages.values()),
                "table_mb": table.memory_usage(deep=True).sum() / 2**20,
                "data_mb": _folder_mb(data, leave_out=cfg.paths.processed),  # MIMIC's files/ and CSVs
                "cache_mb": _folder_mb(cache), "cache_shards": len(list(cache.glob("shard_*.npy"))),
                "loader": loader_rates(cfg, SCALE_LOADER_SAMPLES)}
    return {"image_size": image_size, "sizes": list(sizes), "results": results,
            "training_step": step, "goals": scale_goals(results, step)}


def scale_goals(results: dict, step: dict) -> list[dict]:
    """The issue's goals: the largest size's per-study time and peak RSS within ``SCALE_WITHIN``x
    the smallest's; at every size the 2-worker loader at least the training step's need."""
    small, large = results[min(results, key=int)], results[max(results, key=int)]
    label = f"{large['studies']:,} vs {small['studies']:,} studies"
    goals = [{"goal": f"stages 01-03 seconds per study, {label}", "value": large["stages_s_per_1000"]
              / small["stages_s_per_1000"], "target": f"<= {SCALE_WITHIN}x"},
             {"goal": f"peak RSS of stages 01-03, {label}",
              "value": large["peak_rss_mb"] / small["peak_rss_mb"], "target": f"<= {SCALE_WITHIN}x"}]
    for goal in goals:
        goal["pass"] = goal["value"] <= SCALE_WITHIN
    for r in results.values():
        rate = r["loader"]["samples_per_s"]["2"]
        goals.append({"goal": f"loader with 2 workers vs one demo training step, {r['studies']:,} studies",
                      "value": rate / step["samples_per_s"], "target": ">= 1x",
                      "pass": rate >= step["samples_per_s"]})
    return goals


def format_scale(report: dict) -> str:
    """The scale benchmark's table, the sizes side by side, and one PASS/FAIL line per goal."""
    s = report["scale"]
    results = [s["results"][str(n)] for n in s["sizes"]]
    step = s["training_step"]
    m = report["machine"]
    rows = [("images", lambda r: f"{r['images']:,}"),
            ("phantom build s / 1,000 studies", lambda r: f"{r['phantom_s_per_1000']:.1f}"),
            *[(f"stage {st} s / 1,000 studies", lambda r, st=st: f"{r['stage_s_per_1000'][st]:.2f}")
              for st in STAGES],
            ("stages 01-03 s / 1,000 studies", lambda r: f"{r['stages_s_per_1000']:.2f}"),
            *[(f"stage {st} peak RSS MB", lambda r, st=st: f"{r['stage_peak_rss_mb'][st]:.0f}")
              for st in STAGES],
            ("peak RSS MB (max of 01-03)", lambda r: f"{r['peak_rss_mb']:.0f}"),
            ("studies table in memory MB", lambda r: f"{r['table_mb']:.1f}"),
            ("images + reports + CSVs on disk MB", lambda r: f"{r['data_mb']:.1f}"),
            ("image cache on disk MB", lambda r: f"{r['cache_mb']:.1f}"),
            ("image cache shards", lambda r: f"{r['cache_shards']}"),
            ("loader samples/s, 0 workers", lambda r: f"{r['loader']['samples_per_s']['0']:.0f}"),
            ("loader samples/s, 2 workers", lambda r: f"{r['loader']['samples_per_s']['2']:.0f}"),
            ("loaders gave the same samples", lambda r: f"{r['loader']['same_samples']}")]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}",
             f"scale: phantoms at {s['image_size']} px; stages 01-03 in a child process per size (peak RSS "
             f"reset before each stage); loaders over up to {SCALE_LOADER_SAMPLES:,} training samples",
             f"{'studies':<34}" + "".join(f"{r['studies']:>12,}" for r in results)]
    lines += [f"{name:<34}" + "".join(f"{cell(r):>12}" for r in results) for name, cell in rows]
    lines.append(f"one demo training step (batch {step['batch']}, {step['image_size']} px) consumes "
                 f"{step['samples_per_s']:.1f} samples/s")
    lines += [f"{'PASS' if g['pass'] else 'FAIL'}  {g['goal']}: {g['value']:.2f}x (goal {g['target']})"
              for g in s["goals"]]
    return "\n".join(lines)


def run_scale(sizes: tuple[int, ...], out_dir: Path, name: str = "scale") -> dict:
    """Run the scale benchmark, print its table and write ``out_dir/<name>.json``."""
    report = {"name": name, "machine": machine(), "scale": bench_scale(sizes)}
    path = write_json(out_dir / f"{name}.json", report)
    print(format_scale(report))
    print(f"\nwritten to {path}")
    return report


# --------------------------------------------------------------------------- main

TARGETS = {"image_cache_speedup_512": 20, "image_cache_speedup_2048": 100, "generation_kv_speedup": 10,
           "end_to_end_demo_s": 300, "amp_speedup": 2.5}


def run(quick: bool, name: str, out_dir: Path, num_workers: int = 0) -> dict:
    """Run every benchmark, print the table and write ``out_dir/<name>.json``."""
    repeats = 2 if quick else 3
    report = {"name": name, "quick": quick, "machine": machine(), "repeats": repeats}
    report["images"] = bench_images(quick, repeats, num_workers)
    report["augmentation_cpu"] = augmentation_cost(224, repeats)
    report["image_cache_speedup_512"] = report["images"]["512"]["speedup"]
    report["image_cache_speedup_2048"] = report["images"]["2048"]["speedup"]
    report["generation"] = bench_generation(quick, repeats)
    report["generation_kv_speedup"] = report["generation"]["speedup"]
    report["training"] = bench_training(quick, repeats)
    if not quick:
        report["end_to_end"] = bench_end_to_end()
        report["end_to_end_demo_s"] = report["end_to_end"]["total_s"]
    if torch.cuda.is_available():
        report["gpu"] = bench_accelerated_training(quick)
        report["amp_speedup"] = report["gpu"]["bf16_speedup_over_fp32"]
    else:
        report["gpu"] = "not measured: no GPU on this machine"
    path = write_json(out_dir / f"{name}.json", report)
    print(format_report(report))
    print(f"\nwritten to {path}")
    return report


def format_report(report: dict) -> str:
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"GPU {report['machine']['gpu']}, torch {report['machine']['torch']}", ""]
    lines.append("images to normalised 224 px tensors, images/s (speedup over per-file decode + resize);")
    lines.append("training = ReportDataset.__getitem__ + collate through a DataLoader, as training reads them")
    lines.append(f"{'':<14}{'decode':>9}{'raw cache rows':>22}{'training, no aug':>22}{'training, aug':>22}  equal")
    for name, r in report["images"].items():
        cells = "".join(f"{r[k + '_images_per_s']:>13.0f} ({r[s]:>5.1f}x)" for k, s in (
            ("cached", "speedup"), ("training", "training_speedup"),
            ("training_augmented", "training_augmented_speedup")))
        lines.append(f"{name + ' px' if name.isdigit() else name:<14}{r['naive_images_per_s']:>9.0f}{cells}"
                     f"  {r['identical_outputs']}")
    a = report["augmentation_cpu"]
    lines.append(f"augmentation at {a['image_size']} px: torchvision per view {a['torchvision_per_view_ms']:.2f} ms, "
                 f"augment_views {a['augment_views_ms']:.2f} ms per view ({a['speedup']:.1f}x)")
    g = report["generation"]
    lines += ["", f"generation ({g['decoder']}, batch {g['batch']}, {g['new_tokens']} tokens, greedy; "
                  f"identical outputs: {g['identical_outputs']})",
              f"  KV cache {g['cached_tokens_per_s']:.0f} tok/s, naive {g['naive_tokens_per_s']:.0f} tok/s, "
              f"speedup {g['speedup']:.1f}x; beam 3 takes {g['beam3_over_greedy_time']:.1f}x greedy's time", ""]
    lines.append(f"{'training (CPU)':<44}{'batch':>6}{'samples/s':>11}{'peak RSS MB':>13}")
    for name, r in report["training"].items():
        lines.append(f"{name:<44}{r['batch']:>6}{r['samples_per_s']:>11.2f}{r['peak_rss_mb']:>13.0f}")
    if "end_to_end" in report:
        lines += ["", "demo pipeline, end to end:"]
        lines += [f"  {stage:<32}{seconds:>8.1f} s" for stage, seconds in report["end_to_end"]["stages"].items()]
        lines.append(f"  {'total':<32}{report['end_to_end']['total_s']:>8.1f} s")
    lines += ["", "targets:" if not report["quick"] else
              "targets (quick mode uses smaller shapes than the targets assume; run without --quick):"]
    for key, target in TARGETS.items():
        if key in report:
            value = report[key]
            met = value <= target if key.endswith("_s") else value >= target
            lines.append(f"  {key:<28}{value:>9.1f}  target {'<=' if key.endswith('_s') else '>='} {target}"
                         f"  {'met' if met else 'MISSED'}")
    if isinstance(report["gpu"], dict):
        lines += ["", f"GPU training ({report['gpu']['device']}); MFU against the peak of each mode's math:"]
        for mode in GPU_MODES:
            r = report["gpu"][mode]
            mfu = f"{100 * r['mfu']:.0f}% of {r['peak_tflops']:g}" if r["mfu"] is not None else "n/a"
            lines.append(f"  {mode:<22}{r['samples_per_s']:>9.1f} samples/s  {r['peak_memory_gb'] or 0:>6.1f} GB"
                         f"  {r['tflops']:>7.1f} TFLOP/s  MFU {mfu}  [{r['math']}]")
        if "augmentation" in report["gpu"]:
            g = report["gpu"]["augmentation"]
            lines.append(f"  augment_views on the GPU, {g['views']} views at {g['image_size']} px: "
                         f"{g['ms_per_view']:.4f} ms per view")
    else:
        lines.append(f"  GPU: {report['gpu']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no end-to-end run (about a minute)")
    parser.add_argument("--name", help="file name under logs/bench/ (default: quick or full); "
                        "'scale' runs the scale benchmark instead")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SCALE_SIZES), metavar="N",
                        help="with --name scale: numbers of studies (default: %(default)s)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="config override, e.g. -p paths.output_dir /tmp/out")
    args = parser.parse_args(argv)
    try:
        cfg = load_config("demo", dict(args.p))
    except ConfigError as exc:  # one sentence naming the key or value, as the main CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.name == "scale":
        sizes = tuple(sorted(set(args.sizes)))
        if len(sizes) < 2 or sizes[0] < 1:
            print(f"error: --sizes needs two or more different numbers of studies, each at least 1; "
                  f"got {' '.join(map(str, args.sizes))}", file=sys.stderr)
            return 1
        run_scale(sizes, cfg.paths.logs / "bench")
        return 0
    run(args.quick, args.name or ("quick" if args.quick else "full"), cfg.paths.logs / "bench",
        cfg.train.num_workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
