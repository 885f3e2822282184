"""Runs over several training seeds: per-seed outputs, mean/std, paired bootstrap intervals.

The split is made once (stage 03, the run's ``seed``) and shared: seeds vary the
model's initialisation, batch order and augmentation, never the test studies, so
every seed is scored on the same studies and differences between systems are paired.

Bootstrap: test studies are drawn with replacement (``n`` of ``n``); every system
and every seed is scored on the same draw, and the statistic is the mean over seeds
of (model - baseline) on that draw, with corpus BLEU-4 and clinical macro-F1
recomputed from ``metrics.study_statistics``, which ``metrics.score``'s own steps build
(same texts under the run's ``eval.references``, same prediction labels, macro-F1 by
``metrics.macro_f1_from_counts``, the function that tables it): on all studies the
statistic is the table's difference. The 2.5/97.5 percentiles of that statistic give
the interval (pooled over seeds, resampling test studies).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medexgen_lib.files import read_json, write_json
from medexgen_lib.metrics import R2GEN_CONVENTIONS, macro_f1_from_counts, study_statistics

log = logging.getLogger(__name__)

SEEDS_FILE = "metrics_test_seeds.json"
AGGREGATE_METRICS = ("BLEU-4", "ROUGE-L", "CIDEr", "clinical macro_F1", "clinical micro_F1",
                     "laterality", "distinct_predictions",
                     # the real-text phantom's: drawn findings stated, studies with one given none
                     "drawn_recall", "drawn_precision", "drawn_finding_free_studies", "drawn_missed_studies",
                     "drawn_studies")
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


# --------------------------------------------------------------------------- resampled statistics

def bleu4_from_sums(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (pycocoevalcap's formula) from summed counts ``[..., 10]``."""
    guess, correct = sums[..., 0:4], sums[..., 4:8]
    testlen, reflen = sums[..., 8], sums[..., 9]
    precision = (correct + 1e-15) / (guess + 1e-9)
    score = np.prod(precision, axis=-1) ** 0.25
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return score * penalty


def _score_from_sums(metric: str, weights: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    if metric == "BLEU-4":
        return bleu4_from_sums(weights @ stats["bleu"])
    if metric == "clinical macro_F1":
        return macro_f1_from_counts(np.einsum("bn,nkj->bkj", weights, stats["clinical"]))
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


def config_sha256(cfg) -> str:
    """SHA-256 of a run's settings (``Config``), folders (``paths``) aside: what made a model and scored it."""
    settings = {k: v for k, v in cfg.to_dict().items() if k != "paths"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def metrics_sha256(model_metrics: dict | None) -> str:
    """SHA-256 of a metrics file's model scores: a seed table shows only beside the scores it was
    made from (another labeler or metrics version, or another data folder, scores otherwise)."""
    return hashlib.sha256(json.dumps(model_metrics, sort_keys=True, default=str).encode()).hexdigest()


def aggregate_seeds(output_dirs: Sequence[str | Path], split: str = "test",
                    out_path: str | Path | None = None, n_resamples: int = 2000,
                    training_reports: Sequence[str] | None = None, config_hash: str | None = None) -> dict:
    """Mean ± std over seeds of every system's metrics, and paired bootstrap intervals of
    (model - retrieval) and (model - each constant) on BLEU-4 and macro-F1.

    ``output_dirs``: one run's ``paths.output_dir`` per seed, each with
    ``logs/metrics_<split>.json`` and ``logs/predictions_<split>.json`` from
    ``evaluate.run_evaluation``. The studies are scored under the reference convention
    and uncertainty rule those metrics files record (``training_reports``, the run's
    training texts, give R2Gen's vocabulary where it is ``r2gen``). Written to
    ``out_path`` when given, with ``made_from``: the first seed's model (``model_sha256`` of its
    metrics file) and scores (``metrics_sha256``) and ``config_hash`` (``config_sha256`` of the run's config), which
    ``seeds_for_run`` checks before a notebook shows the file.
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
    scoring = _scoring_options(output_dirs, split, summaries, training_reports)
    systems = {MODEL: [s["model"] for s in summaries]}
    for name in summaries[0]["baselines"]:
        systems[name] = [s["baselines"][name] for s in summaries]
    table = {name: {m: mean_std([v.get(m) for v in values]) for m in AGGREGATE_METRICS}
             for name, values in systems.items()}
    references = [r["reference"] for r in rows[0]]
    stats = {MODEL: [study_statistics(references, [r["prediction"] for r in seed_rows], **scoring,
                                      decoder_texts=[r.get("decoder_text") for r in seed_rows])
                     for seed_rows in rows]}
    bootstrap = {}
    for baseline in (RETRIEVAL, *CONSTANTS):
        if not all("baseline_predictions" in r for r in rows[0]):
            raise ValueError(f"{output_dirs[0]}/logs/predictions_{split}.json has no baseline "
                             "predictions; re-run the evaluation with this version")
        stats[baseline] = [study_statistics(references, [r["baseline_predictions"][baseline]
                                                         for r in seed_rows], **scoring)
                           for seed_rows in rows]
    for name, per_seed in stats.items():
        _check_tabled(name, per_seed, systems[name], output_dirs, split)
    for baseline in (RETRIEVAL, *CONSTANTS):
        bootstrap[f"model - {baseline}"] = {
            metric: paired_bootstrap(stats[MODEL], stats[baseline], metric, n_resamples)
            for metric in BOOTSTRAP_METRICS}
    result = {"split": split, "n_seeds": len(summaries), "n_studies": len(uids),
              "output_dirs": [str(d) for d in output_dirs],
              "seeds": [s.get("seed") for s in summaries], "metrics": table, "bootstrap": bootstrap,
              "made_from": {"model_sha256": summaries[0].get("model_sha256"), "config_sha256": config_hash,
                            "metrics_sha256": metrics_sha256(summaries[0].get("model"))},
              "bootstrap_note": ("paired bootstrap over test studies (one draw for all seeds and "
                                 "systems), statistic = mean over seeds of (model - baseline), scored "
                                 f"as the table is (references {scoring['reference_convention']}); "
                                 "95% percentile interval")}
    if out_path is not None:
        write_json(out_path, result)
    return result


def _check_tabled(name: str, per_seed: Sequence[dict], tabled: Sequence[dict],
                  output_dirs: Sequence[str | Path], split: str) -> None:
    """The statistics resampled must give the tabled macro-F1 on all studies: a predictions file
    and a metrics file that disagree (edited, or scored by another version) are refused."""
    for directory, stats, metrics in zip(output_dirs, per_seed, tabled, strict=True):
        resampled = float(_score_from_sums("clinical macro_F1", np.ones((1, len(stats["bleu"]))), stats)[0])
        if not math.isclose(resampled, metrics.get("clinical macro_F1", math.nan), abs_tol=1e-9):
            raise ValueError(f"{directory}/logs/metrics_{split}.json gives {name} clinical macro_F1 "
                             f"{metrics.get('clinical macro_F1')}, its predictions_{split}.json scores "
                             f"{resampled:.6f}; re-run that seed's evaluation (notebook 05_evaluation)")


def _scoring_options(output_dirs: Sequence[str | Path], split: str, summaries: Sequence[dict],
                     training_reports: Sequence[str] | None) -> dict:
    """``study_statistics``' options as the seeds' metrics files record them (the same for all)."""
    recorded = [(s["model"].get("references", "full"), s["model"].get("clinical uncertain_as_positive", False))
                for s in summaries]
    for directory, settings in zip(output_dirs, recorded):
        if settings != recorded[0]:
            raise ValueError(f"{directory}/logs/metrics_{split}.json was scored with references "
                             f"{settings[0]!r}, uncertain_as_positive {settings[1]}; "
                             f"{output_dirs[0]}'s with {recorded[0][0]!r}, {recorded[0][1]}")
    convention, uncertain = recorded[0]
    if convention in R2GEN_CONVENTIONS and not training_reports:
        raise ValueError(f"{output_dirs[0]}/logs/metrics_{split}.json was scored with references {convention}: "
                         "the bootstrap needs the run's training reports (R2Gen's vocabulary)")
    return {"uncertain_as_positive": uncertain, "reference_convention": convention,
            "training_reports": training_reports if convention in R2GEN_CONVENTIONS else None}


def seeds_for_run(cfg, summary: dict) -> tuple[dict | None, str]:
    """The seeds file in ``cfg``'s logs if it was made from the model and config of the run that
    wrote ``summary`` (its ``metrics_<split>.json``), else None; and a sentence saying which."""
    path = cfg.paths.logs / SEEDS_FILE
    if not path.exists():
        return None, (f"no seed table for this run ({path} does not exist): run `python -m medexgen_lib run "
                      f"--profile {cfg.profile} --seeds 3` for the table with spreads")
    seeds = read_json(path)
    made_from = seeds.get("made_from") or {}
    this_run = {"model_sha256": summary.get("model_sha256"), "config_sha256": config_sha256(cfg),
                "metrics_sha256": metrics_sha256(summary.get("model"))}
    if seeds.get("split") != summary.get("split") or made_from != this_run:
        differ = [k.split("_")[0] for k in this_run if made_from.get(k) != this_run[k]] or ["split"]
        return None, (f"no seed table for this run: {path} was made from another {' and '.join(differ)} "
                      f"(an earlier invocation); it is not shown")
    return seeds, f"seed table of this model and config ({path})"


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
        from medexgen_lib.preprocess import load_split

        training_reports = [e.text for e in load_split(cfg, "train").examples]  # as run_evaluation's
        return results, aggregate_seeds(dirs, out_path=cfg.paths.logs / SEEDS_FILE,
                                        training_reports=training_reports, config_hash=config_sha256(cfg))


def main(argv: list[str] | None = None) -> int:
    """``python -m medexgen_lib.seeds OUTPUT_DIR``: the seed tables of a finished ``run --seeds``
    in OUTPUT_DIR (its own run and ``seeds/seed_*``), aggregated again and printed."""
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib.seeds",
                                     description="print the seed tables of a finished `run --seeds`")
    parser.add_argument("output_dir", help="the run's paths.output_dir")
    args = parser.parse_args(argv)
    root = Path(args.output_dir)
    extra = [d for d in root.glob("seeds/seed_*") if d.name.removeprefix("seed_").isdecimal()]
    dirs = [root, *sorted(extra, key=lambda d: int(d.name.removeprefix("seed_")))]
    try:
        result = aggregate_seeds(dirs)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(seeds_table(result).to_string())
    print(bootstrap_table(result).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
