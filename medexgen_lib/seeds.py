"""Runs over several training seeds: per-seed outputs, mean/std, paired bootstrap intervals.

The split is made once (stage 03, the run's ``seed``) and shared: seeds vary the
model's initialisation, batch order and augmentation, never the test studies, so
every seed is scored on the same studies and differences between systems are paired.

Bootstrap: test studies are drawn with replacement (``n`` of ``n``); every system
and every seed is scored on the same draw, and the statistic is the mean over seeds
of (model - baseline) on that draw, with corpus BLEU-4 and clinical macro-F1
recomputed exactly as ``metrics.score`` computes them. The 2.5/97.5 percentiles
of that statistic give the interval (pooled over seeds, resampling test studies).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medexgen_lib.files import read_json, write_json
from medexgen_lib.labeler import OBSERVATIONS, label_report, positive_set

log = logging.getLogger(__name__)

SEEDS_FILE = "metrics_test_seeds.json"
AGGREGATE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr", "clinical macro_F1", "clinical micro_F1",
                     "laterality", "distinct_predictions")
BOOTSTRAP_METRICS = ("BLEU-4", "clinical macro_F1")
MODEL = "model"
RETRIEVAL = "retrieval (nearest image)"
CONSTANTS = ("constant (most frequent)", "constant (best of top 50 on val)")


def seed_count(text: str) -> int:
    """``--seeds`` on the command line (``argparse`` type): a whole number of at least 1, so that
    ``--seeds 0`` stops with a usage error before anything is run or rewritten."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


# --------------------------------------------------------------------------- per-study statistics

def study_statistics(references: Sequence[str], predictions: Sequence[str],
                     uncertain_as_positive: bool = False) -> dict[str, np.ndarray]:
    """Per-study sufficient statistics of corpus BLEU-4 (pycocoevalcap's counts on the
    normalised text) and of clinical F1 (TP/FP/FN per observation), so that any resample
    of studies is scored by sums."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    from medexgen_lib.metrics import normalise

    bleu = np.zeros((len(references), 10))  # guess x4, correct x4, testlen, reflen
    for i, (ref, pred) in enumerate(zip(references, predictions)):
        comps = cook_test(normalise(pred), cook_refs([normalise(ref)]))
        bleu[i] = [*comps["guess"], *comps["correct"], comps["testlen"], comps["reflen"][0]]
    refs = [positive_set(label_report(r), uncertain_as_positive, OBSERVATIONS) for r in references]
    preds = [positive_set(label_report(p), uncertain_as_positive, OBSERVATIONS) for p in predictions]
    clinical = np.zeros((len(references), 3, len(OBSERVATIONS)))  # tp, fp, fn
    for i, (r, p) in enumerate(zip(refs, preds)):
        for j, obs in enumerate(OBSERVATIONS):
            clinical[i, :, j] = [obs in r and obs in p, obs not in r and obs in p, obs in r and obs not in p]
    return {"bleu": bleu, "clinical": clinical}


def bleu4_from_sums(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (pycocoevalcap's formula) from summed counts ``[..., 10]``."""
    guess, correct = sums[..., 0:4], sums[..., 4:8]
    testlen, reflen = sums[..., 8], sums[..., 9]
    precision = (correct + 1e-15) / (guess + 1e-9)
    score = np.prod(precision, axis=-1) ** 0.25
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return score * penalty


def macro_f1_from_sums(sums: np.ndarray) -> np.ndarray:
    """Clinical macro-F1 (observations with reference support only) from summed ``[..., 3, O]``."""
    tp, fp, fn = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    present = (tp + fn) > 0
    return (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1)


def _score_from_sums(metric: str, weights: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    if metric == "BLEU-4":
        return bleu4_from_sums(weights @ stats["bleu"])
    if metric == "clinical macro_F1":
        sums = np.einsum("bn,nkj->bkj", weights, stats["clinical"])
        return macro_f1_from_sums(sums)
    raise ValueError(f"no bootstrap for metric {metric!r}; known: {BOOTSTRAP_METRICS}")


def paired_bootstrap(model_stats: Sequence[dict], baseline_stats: Sequence[dict], metric: str,
                     n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over seeds of (model - baseline) on ``metric``, with the 95% percentile interval
    over resamples of test studies (the same draw for every seed and both systems)."""
    n = model_stats[0]["bleu"].shape[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(float)
    observed = np.ones((1, n))
    diffs, point = np.zeros(n_resamples), 0.0
    for model, baseline in zip(model_stats, baseline_stats, strict=True):
        diffs += _score_from_sums(metric, weights, model) - _score_from_sums(metric, weights, baseline)
        point += float((_score_from_sums(metric, observed, model)
                        - _score_from_sums(metric, observed, baseline))[0])
    diffs /= len(model_stats)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": point / len(model_stats), "ci95": [float(low), float(high)],
            "excludes_zero": bool(low > 0 or high < 0), "n_resamples": n_resamples,
            "n_studies": n, "n_seeds": len(model_stats)}


# --------------------------------------------------------------------------- aggregation

def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return {"mean": float(np.mean(finite)), "std": std, "n": len(finite)}


def aggregate_seeds(output_dirs: Sequence[str | Path], split: str = "test",
                    out_path: str | Path | None = None, n_resamples: int = 2000) -> dict:
    """Mean ± std over seeds of every system's metrics, and paired bootstrap intervals of
    (model - retrieval) and (model - each constant) on BLEU-4 and macro-F1.

    ``output_dirs``: one run's ``paths.output_dir`` per seed, each with
    ``logs/metrics_<split>.json`` and ``logs/predictions_<split>.json`` from
    ``evaluate.run_evaluation``. Written to ``out_path`` when given.
    """
    summaries, rows = [], []
    for directory in output_dirs:
        logs = Path(directory) / "logs"
        for name in (f"metrics_{split}.json", f"predictions_{split}.json"):
            if not (logs / name).exists():
                raise FileNotFoundError(f"{logs / name} not found; evaluate that seed's run first "
                                        "(notebook 05_evaluation or evaluate.run_evaluation)")
        summaries.append(read_json(logs / f"metrics_{split}.json"))
        rows.append(read_json(logs / f"predictions_{split}.json"))
    uids = [r["uid"] for r in rows[0]]
    for directory, seed_rows in zip(output_dirs, rows):
        if [r["uid"] for r in seed_rows] != uids:
            raise ValueError(f"{directory}: its {split} studies differ from {output_dirs[0]}'s; "
                             "seeds must share one split (run stage 03 once)")
    systems = {MODEL: [s["model"] for s in summaries]}
    for name in summaries[0]["baselines"]:
        systems[name] = [s["baselines"][name] for s in summaries]
    table = {name: {m: mean_std([v.get(m) for v in values]) for m in AGGREGATE_METRICS}
             for name, values in systems.items()}
    uncertain = summaries[0]["model"].get("clinical uncertain_as_positive", False)
    references = [r["reference"] for r in rows[0]]
    stats = {MODEL: [study_statistics(references, [r["prediction"] for r in seed_rows], uncertain)
                     for seed_rows in rows]}
    bootstrap = {}
    for baseline in (RETRIEVAL, *CONSTANTS):
        if not all("baseline_predictions" in r for r in rows[0]):
            raise ValueError(f"{output_dirs[0]}/logs/predictions_{split}.json has no baseline "
                             "predictions; re-run the evaluation with this version")
        stats[baseline] = [study_statistics(references, [r["baseline_predictions"][baseline]
                                                         for r in seed_rows], uncertain)
                           for seed_rows in rows]
        bootstrap[f"model - {baseline}"] = {
            metric: paired_bootstrap(stats[MODEL], stats[baseline], metric, n_resamples)
            for metric in BOOTSTRAP_METRICS}
    result = {"split": split, "n_seeds": len(summaries), "n_studies": len(uids),
              "output_dirs": [str(d) for d in output_dirs],
              "seeds": [s.get("seed") for s in summaries], "metrics": table, "bootstrap": bootstrap,
              "bootstrap_note": ("paired bootstrap over test studies (one draw for all seeds and "
                                 "systems), statistic = mean over seeds of (model - baseline); "
                                 "95% percentile interval")}
    if out_path is not None:
        write_json(out_path, result)
    return result


def seeds_table(result: dict):
    """The aggregate as a DataFrame: one row per system, 'mean ± std' per metric."""
    import pandas as pd

    return pd.DataFrame({name: {m: _pm(v) for m, v in metrics.items()}
                         for name, metrics in result["metrics"].items()}).T


def bootstrap_table(result: dict):
    """The bootstrap intervals as a DataFrame: comparison x metric -> 'diff [low, high]'."""
    import pandas as pd

    return pd.DataFrame({comparison: {m: f"{v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                                      for m, v in metrics.items()}
                         for comparison, metrics in result["bootstrap"].items()}).T


def _pm(value: dict) -> str:
    if value["mean"] is None:
        return "n/a"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


# --------------------------------------------------------------------------- runner

def seed_output_dir(output_dir: str | Path, seed: int) -> Path:
    """Where an extra seed's run writes (the first seed uses the run's own output folder)."""
    return Path(output_dir) / "seeds" / f"seed_{seed}"


def run_seeds(profile: str, overrides: dict, n_seeds: int, start: str | None = None,
              stop: str | None = None) -> tuple[list, dict]:
    """The pipeline once (stages ``start``..``stop``, the run's ``seed``), then stages 04-05 for
    ``n_seeds - 1`` further training seeds (seed+1, ...) into ``seeds/seed_<s>/`` of the output
    folder, sharing stage 03's split; then ``aggregate_seeds`` into ``logs/metrics_test_seeds.json``."""
    from medexgen_lib.config import load_config
    from medexgen_lib.locks import folder_lock
    from medexgen_lib.pipeline import run_pipeline

    if n_seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {n_seeds}")
    cfg = load_config(profile, overrides)
    with folder_lock(cfg.paths.output_dir):  # every seed's run and the aggregate: one run
        results = run_pipeline(profile, overrides, start, stop)
        dirs = [Path(cfg.paths.output_dir)]
        for k in range(1, n_seeds):
            seed = cfg.seed + k
            out = seed_output_dir(cfg.paths.output_dir, seed)
            log.info("seed %d of %d (seed=%d) -> %s", k + 1, n_seeds, seed, out)
            results += run_pipeline(profile, {**overrides, "seed": seed, "paths.output_dir": str(out)},
                                    "04", "05")
            dirs.append(out)
        return results, aggregate_seeds(dirs, out_path=cfg.paths.logs / SEEDS_FILE)
