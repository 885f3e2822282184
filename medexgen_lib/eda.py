"""Stage 02: numbers and figures that describe the studies table."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from PIL import Image
from tqdm.auto import tqdm

from medexgen_lib.files import save_figure, write_json
from medexgen_lib.text import target_texts

log = logging.getLogger(__name__)

WORD = re.compile(r"[a-z]+")
TOKEN = re.compile(r"\w+|[^\w\s]+")  # words and punctuation runs, as BLEU tokenisers split
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it of on or the there this to was were "
    "with no not".split())


def report_text(table: pd.DataFrame, target: str = "findings+impression", lowercase: bool = False) -> pd.Series:
    """The text the model learns to write (``text.target_texts``: cleaned, list numbering removed),
    so that words and sentences are counted as training sees them, not as the raw XML has them."""
    return target_texts(table, target, lowercase).fillna("")


def compute_eda_stats(table: pd.DataFrame, top: int = 25, target: str = "findings+impression",
                      lowercase: bool = False) -> dict:
    """Counts, lengths, frequent words/sentences, duplicates, MeSH and image statistics.

    Text statistics describe ``report_text(table, target, lowercase)``: pass ``cfg.text``'s
    ``target`` and ``lowercase`` so they describe the run's own target.
    """
    text = report_text(table, target, lowercase)
    lowered = text.str.lower()
    with_text = text != ""
    sentences = Counter(s.strip() for t in lowered[with_text] for s in SENTENCE_END.split(t) if s.strip())
    # one report's words at a time: every report's word and token lists held at once grew
    # stage 02's memory with the data set (~7 kB per report)
    word_counts: Counter = Counter()
    n_words, n_tokens = [], []
    for report in lowered:
        words = WORD.findall(report)
        word_counts.update(w for w in words if w not in STOPWORDS)
        n_words.append(len(words))
        n_tokens.append(len(TOKEN.findall(report)))
    duplicated = lowered[with_text].duplicated(keep=False)
    mesh = Counter(term for terms in table["mesh_major"] for term in
                   {t.split("/")[0].strip() for t in terms})
    stats = {
        "text": f"text.target {target}, cleaned with text.clean_report (as the model learns it)",
        "reports": int(len(table)),
        "images_referenced": int(table["n_images"].sum()),
        "images_on_disk": int(sum(1 for ps in table["image_paths"] for p in ps if p)),
        "images_per_report": {str(k): int(v) for k, v in
                              sorted(Counter(table["n_images"]).items())},
        "missing": {
            "no_findings": int(table["no_findings"].sum()),
            "no_impression": int(table["no_impression"].sum()),
            "no_findings_and_no_impression": int((table["no_findings"] & table["no_impression"]).sum()),
            "no_image": int(table["no_image"].sum()),
            "image_missing_on_disk": int(table["image_missing"].sum()),
        },
        "length_words": _describe(pd.Series(n_words, index=lowered.index)[with_text]),
        "length_tokens": _describe(pd.Series(n_tokens, index=lowered.index)[with_text]),
        "top_words": word_counts.most_common(top),
        "top_sentences": sentences.most_common(top),
        "distinct_reports": int(lowered[with_text].nunique()),
        "duplicate_report_share": float(duplicated.mean()) if len(duplicated) else 0.0,
        "mesh_major_prevalence": [(t, int(n), n / len(table)) for t, n in mesh.most_common(top)],
        "images": _image_stats(table),
        "projections": _projection_counts(table),
    }
    return stats


def _projection_counts(table: pd.DataFrame) -> dict:
    """Frontal/lateral/unknown per image, view combinations per study, and which table gave them."""
    with_images = table[table["n_images"] > 0]
    combos = Counter(" + ".join(sorted(ps)) for ps in with_images["projections"])
    return {"images": dict(Counter(p for ps in table["projections"] for p in ps)),
            "studies_by_views": dict(combos.most_common()),
            "source": dict(Counter(with_images["projection_source"]))}


def _describe(values: pd.Series) -> dict:
    if values.empty:
        return {}
    return {"mean": float(values.mean()), "median": float(values.median()),
            "p95": float(values.quantile(0.95)), "max": int(values.max()), "min": int(values.min())}


def _image_stats(table: pd.DataFrame) -> dict:
    """Size and mode of every image on disk (header reads only, no decoding)."""
    paths = [p for ps in table["image_paths"] for p in ps if p]
    sizes, modes, unreadable = [], Counter(), []
    for path in tqdm(paths, desc="image headers", unit="img", disable=len(paths) < 200):
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
                modes[im.mode] += 1
        except OSError as exc:
            unreadable.append(f"{path}: {exc}")
    if unreadable:
        log.warning("%d images could not be read, first: %s", len(unreadable), unreadable[0])
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    return {"count": len(sizes), "modes": dict(modes), "unreadable": unreadable[:20],
            "width": _describe(pd.Series(widths, dtype=float)),
            "height": _describe(pd.Series(heights, dtype=float)),
            "sizes": Counter(f"{w}x{h}" for w, h in sizes).most_common(10)}


def plot_eda(table: pd.DataFrame, stats: dict, plots_dir: str | os.PathLike,
             target: str = "findings+impression", lowercase: bool = False) -> list[Path]:
    """Save the EDA figures as ``plots_dir/eda_*.png`` and return their paths."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    saved = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    per_report = stats["images_per_report"]
    sns.barplot(x=list(per_report), y=list(per_report.values()), ax=axes[0], color="steelblue")
    axes[0].set(title="Images per report", xlabel="images", ylabel="reports")
    missing = stats["missing"]
    sns.barplot(x=list(missing.values()), y=[k.replace("_", " ") for k in missing], ax=axes[1],
                color="indianred")
    axes[1].set(title=f"Missing parts (of {stats['reports']} reports)", xlabel="reports")
    views = stats["projections"]["images"]
    sns.barplot(x=list(views), y=list(views.values()), ax=axes[2], color="slategray")
    sources = ", ".join(stats["projections"]["source"]) or "none"
    axes[2].set(title=f"Image projections (from: {_short(sources, 40)})", xlabel="projection",
                ylabel="images")
    saved.append(_save(fig, plots_dir / "eda_counts.png"))

    text = report_text(table, target, lowercase).str.lower()
    lengths = pd.DataFrame({"words": text.map(lambda t: len(WORD.findall(t))),
                            "tokens": text.map(lambda t: len(TOKEN.findall(t)))})[text != ""]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, column in zip(axes, ("words", "tokens")):
        sns.histplot(lengths[column], bins=40, ax=ax, color="steelblue")
        p95 = stats[f"length_{column}"].get("p95", 0)
        ax.axvline(p95, color="black", ls="--", label=f"95th percentile ({p95:.0f})")
        ax.set(title=f"Report length ({target}), {column}", xlabel=column)
        ax.legend()
    saved.append(_save(fig, plots_dir / "eda_report_lengths.png"))

    for name, key, title in (("eda_top_words.png", "top_words", "Most frequent words (no stopwords)"),
                             ("eda_top_sentences.png", "top_sentences", "Most frequent sentences")):
        items = stats[key][:20]
        if not items:
            continue
        fig, ax = plt.subplots(figsize=(10, 0.3 * len(items) + 1.2))
        sns.barplot(x=[n for _, n in items], y=[_short(t) for t, _ in items], ax=ax, color="seagreen")
        ax.set(title=title, xlabel="count")
        saved.append(_save(fig, plots_dir / name))

    mesh = stats["mesh_major_prevalence"][:20]
    if mesh:
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(mesh) + 1.2))
        sns.barplot(x=[100 * share for _, _, share in mesh], y=[t for t, _, _ in mesh], ax=ax,
                    color="darkorange")
        ax.set(title="MeSH major terms (share of reports)", xlabel="% of reports")
        saved.append(_save(fig, plots_dir / "eda_mesh_terms.png"))

    sizes = [tuple(map(int, s.split("x"))) for s, n in stats["images"]["sizes"] for _ in range(n)]
    if sizes:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        arr = np.array(sizes)
        axes[0].scatter(arr[:, 0], arr[:, 1], alpha=0.3, s=12)
        axes[0].set(title="Image sizes (10 most common)", xlabel="width (px)", ylabel="height (px)")
        modes = stats["images"]["modes"]
        sns.barplot(x=list(modes), y=list(modes.values()), ax=axes[1], color="slategray")
        axes[1].set(title="Image modes", xlabel="PIL mode", ylabel="images")
        saved.append(_save(fig, plots_dir / "eda_images.png"))
    return saved


def run_eda(table: pd.DataFrame, plots_dir: str | os.PathLike, stats_path: str | os.PathLike,
            target: str = "findings+impression", lowercase: bool = False) -> tuple[dict, list[Path]]:
    """Compute the statistics, write them as JSON (atomically) and save the figures."""
    stats = compute_eda_stats(table, target=target, lowercase=lowercase)
    write_json(stats_path, stats)
    return stats, plot_eda(table, stats, plots_dir, target, lowercase)


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)
