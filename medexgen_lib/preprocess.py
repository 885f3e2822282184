"""Stage 03: cleaning, splits, tokenizer and image cache, from the studies table."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medexgen_lib.config import Config
from medexgen_lib.dataset import ReportDataset
from medexgen_lib.files import read_json, save_figure, write_json
from medexgen_lib.images import ImageCache
from medexgen_lib.reports import load_studies_table
from medexgen_lib.splits import (SOURCE_SPLIT_FILE, SOURCES_WITH_SPLIT, SPLITS, is_abnormal, load_splits,
                                 make_splits, splits_from_annotation, usable_studies, write_splits)
from medexgen_lib.text import target_texts
from medexgen_lib.tokenizer import build_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SUMMARY_FILE = "preprocessing.json"


@dataclass
class PreprocessSummary:
    """What stage 03 wrote, for the notebook and for later stages."""

    studies: int
    dropped: dict[str, int]
    split_source: str
    split_counts: dict[str, dict[str, int | None]]  # "abnormal" None: no MeSH terms to tell
    tokenizer_dir: str
    tokenizer_used: str
    vocab_size: int
    image_cache: str
    images_cached: int
    images_skipped: int
    token_lengths: dict[str, float]
    truncated_share: float


def run_preprocessing(cfg: Config) -> PreprocessSummary:
    """Write ``processed/splits.json``, ``processed/tokenizer/`` and the image cache."""
    processed = cfg.paths.processed
    table = load_studies_table(cfg.paths.studies_table)
    texts = target_texts(table, cfg.text.target, cfg.text.lowercase)
    usable, dropped = usable_studies(table, texts, cfg.split.require_findings)
    log.info("%d of %d studies usable; left out: %s", len(usable), len(table), dropped)
    if usable.empty:
        raise ValueError(f"no usable studies in {cfg.paths.studies_table} (left out: {dropped})")

    source_split = processed / SOURCE_SPLIT_FILE
    if cfg.split.annotation_file:
        splits, missing = splits_from_annotation(cfg.split.annotation_file, usable)
        split_source = f"annotation:{cfg.split.annotation_file}"
        dropped["annotation_ids_not_usable"] = sum(missing.values())
    elif cfg.data.source in SOURCES_WITH_SPLIT:  # the split the data set carries (stage 01 wrote it)
        if not source_split.exists():
            raise FileNotFoundError(f"{source_split} not found; run notebook 01_acquisition first")
        splits, missing = splits_from_annotation(source_split, usable, ids_are_uids=True)
        split_source = f"source:{cfg.data.source}"
        dropped["source_split_ids_not_usable"] = sum(missing.values())
    else:
        splits = make_splits(usable, cfg.seed, cfg.split.val_fraction, cfg.split.test_fraction)
        split_source = f"random:seed={cfg.seed}"
    # normal/abnormal is MeSH's (IU X-Ray); sources without MeSH terms (annotation, mimic) leave it unknown
    has_mesh = bool(usable["mesh_major"].map(len).any())
    abnormal = dict(zip(usable["uid"], usable["mesh_major"].map(is_abnormal)))
    counts = {name: {"studies": len(uids),
                     "abnormal": int(sum(abnormal[u] for u in uids)) if has_mesh else None}
              for name, uids in splits.items()}
    for name, c in counts.items():
        log.info("split %-5s %5d studies (%s abnormal)", name, c["studies"],
                 c["abnormal"] if has_mesh else "no MeSH terms: unknown how many")
    write_splits(splits, processed / "splits.json",
                 {"source": split_source, "counts": counts, "dropped": dropped})

    text_of = dict(zip(usable["uid"], texts.loc[usable.index]))
    tokenizer_dir = processed / "tokenizer"
    tokenizer = build_tokenizer(cfg.tokenizer.kind, [text_of[u] for u in splits["train"]],
                                tokenizer_dir, cfg.tokenizer.gpt2_source, cfg.tokenizer.vocab_size)
    lengths = count_tokens(tokenizer, list(text_of.values()))

    images = sorted({(i, p) for ids, paths in zip(usable["image_ids"], usable["image_paths"])
                     for i, p in zip(ids, paths) if p})
    cache = ImageCache.build(images, cfg.images.size, processed / "image_cache",
                             cfg.images.max_pixels, cfg.images.bad_image)
    summary = PreprocessSummary(
        studies=len(usable), dropped=dropped, split_source=split_source, split_counts=counts,
        tokenizer_dir=str(tokenizer_dir),
        tokenizer_used=read_json(tokenizer_dir / "source.json")["used"],
        vocab_size=len(tokenizer), image_cache=str(cache.folder), images_cached=len(cache),
        images_skipped=len(cache.bad),
        token_lengths={"mean": float(lengths.mean()), "p95": float(np.percentile(lengths, 95)),
                       "max": int(lengths.max())},
        truncated_share=float((lengths > cfg.text.max_length).mean()))
    write_json(processed / SUMMARY_FILE, asdict(summary))
    cfg.save(processed / "config_03_preprocessing.json")
    return summary


COUNT_BATCH = 1_000  # texts encoded at once: a fast tokenizer's encodings of all texts would
# hold ~7 kB per text (tokens, offsets) at the same time, memory growing with the data set


def count_tokens(tokenizer, texts: list[str]) -> np.ndarray:
    """Length of each text in tokens, bos and eos included (what training feeds the decoder),
    encoded ``COUNT_BATCH`` texts at a time so that memory does not grow with their number."""
    lengths: list[int] = []
    for start in range(0, len(texts), COUNT_BATCH):
        encoded = tokenizer(texts[start:start + COUNT_BATCH], add_special_tokens=False)["input_ids"]
        lengths.extend(len(ids) + 2 for ids in encoded)
    return np.array(lengths)


def token_lengths(cfg: Config) -> np.ndarray:
    """Token count (with bos/eos) of every usable study's target text, for the histogram."""
    table = load_studies_table(cfg.paths.studies_table)
    texts = target_texts(table, cfg.text.target, cfg.text.lowercase)
    usable, _ = usable_studies(table, texts, cfg.split.require_findings)
    return count_tokens(load_tokenizer(cfg.paths.processed / "tokenizer"), texts.loc[usable.index].tolist())


def load_split(cfg: Config, split: str, augment: bool = False,
               shuffle_images_seed: int | None = None) -> ReportDataset:
    """The dataset of one split, from the files stage 03 wrote."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    processed = cfg.paths.processed
    summary_path = processed / SUMMARY_FILE
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found; run notebook 03_preprocessing first")
    summary = read_json(summary_path)
    table = load_studies_table(cfg.paths.studies_table)
    uids = set(load_splits(processed / "splits.json")[split])
    studies = table[table["uid"].isin(uids)]
    texts = target_texts(studies, cfg.text.target, cfg.text.lowercase)
    return ReportDataset(studies, texts, ImageCache(Path(summary["image_cache"])),
                         load_tokenizer(summary["tokenizer_dir"]), cfg.text.max_length,
                         cfg.images.missing_view, augment=augment,
                         shuffle_images_seed=shuffle_images_seed)


def plot_token_lengths(lengths: np.ndarray, max_length: int, path: Path) -> Path:
    """Histogram of target lengths in tokens with the configured maximum marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(lengths, bins=40, color="steelblue")
    share = float((lengths > max_length).mean())
    ax.axvline(max_length, color="crimson", ls="--",
               label=f"text.max_length = {max_length} ({share:.1%} truncated)")
    ax.set(title="Target length in tokens (with bos/eos)", xlabel="tokens", ylabel="studies")
    ax.legend()
    return save_figure(fig, path)


def plot_image_grid(datasets: dict[str, ReportDataset], path: Path, per_split: int = 4) -> Path:
    """Frontal and lateral views of the first studies of each split, as the model sees them."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(datasets), 2 * per_split,
                             figsize=(2 * per_split * 1.6, len(datasets) * 1.9), squeeze=False)
    for row, (name, dataset) in enumerate(datasets.items()):
        for k in range(per_split):
            for v in range(2):
                ax = axes[row, 2 * k + v]
                ax.axis("off")
                if k < len(dataset):
                    ax.imshow(dataset[k]["pixels"][v].numpy(), cmap="gray", vmin=0, vmax=255)
                    ax.set_title(f"{name} {dataset.examples[k].uid} {'FL'[v]}", fontsize=7)
    return save_figure(fig, path)
