"""Ablation of the generator's levers: each row trained and evaluated with the same seeds and data.

    python -m medexgen_lib.ablation [--profile demo] [--seeds 3] [--rows NAME ...] [-p KEY VALUE ...]

Stages 01-03 run once per image size (same phantom, same split); every row x seed trains (stage 04) and evaluates
(stage 05) in ``<output_dir>/ablation/<row>/seed_<s>/``. The table (mean ± std over
seeds) goes to ``<output_dir>/logs/ablation.json`` and ``ablation.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

from medexgen_lib.config import Config, ConfigError, load_config
from medexgen_lib.files import read_json, write_json, write_text_atomic
from medexgen_lib.labeler import LABELER_VERSION
from medexgen_lib.locks import folder_lock
from medexgen_lib.metrics import METRICS_VERSION
from medexgen_lib.seeds import RETRIEVAL, mean_std, seed_count
from medexgen_lib.tracking import flatten

log = logging.getLogger(__name__)

# Row -> overrides on top of the profile. The demo profile is the last row's settings, so
# the earlier rows switch the new defaults off again. "seed design" is the demo as it was
# (96 px, 16 epochs, no guidance); the later rows add one lever at a time.
SEED_DESIGN = {"images.size": 96, "images.augment": True, "train.epochs": 16,
               "train.batch_size": 16, "train.patience": 6, "train.encoder_epochs": 0,
               "train.selection_metric": "clinical macro_F1", "guidance.head": False,
               "guidance.embedding": False, "guidance.prompt": False, "guidance.decoder": False,
               "guidance.decoder_input": "predicted", "guidance.align_sides": False, "guidance.pool": 2,
               "guidance.state_findings": False, "train.export": "best"}
CHEAP = {**SEED_DESIGN, "images.size": 64, "images.augment": False, "train.epochs": 12,
         "train.batch_size": 8}
HEAD = {**CHEAP, "guidance.head": True}
EMBEDDING = {**HEAD, "guidance.embedding": True, "guidance.decoder_input": "true"}
PROMPT = {**EMBEDDING, "guidance.prompt": True}
BEST_ON_VAL = {"train.export": "best"}  # the rows before the last epoch was exported
ROWS: dict[str, dict] = {
    "seed design (old lr groups)": {**SEED_DESIGN, "train.cross_attention_lr": "decoder"},
    "lr groups fixed": SEED_DESIGN,
    "64 px, 12 epochs of batch 8, no augmentation": CHEAP,
    "+ observation head": HEAD,
    "+ guidance embedding (true labels at training)": EMBEDDING,
    "+ guidance prompt (label words, thresholds on val)": PROMPT,
    "+ encoder and head frozen after 5 of 15 epochs, checkpoint by macro-F1 + BLEU-4": {
        **BEST_ON_VAL, "guidance.align_sides": False, "guidance.pool": 2, "train.freeze_head": True,
        "guidance.state_findings": False},
    "+ head pools each view 3x3": {**BEST_ON_VAL, "guidance.align_sides": False, "train.freeze_head": True,
                                   "guidance.state_findings": False},
    "+ head goes on training on the cached features": {**BEST_ON_VAL, "guidance.align_sides": False,
                                                       "guidance.state_findings": False},
    "+ side words from the head": {**BEST_ON_VAL, "guidance.state_findings": False},
    "+ findings the text omits stated from a sentence bank": BEST_ON_VAL,
    "best combination (demo default: + the last epoch exported, not the best on val)": {},
}
ROW_FILE = "row.json"
# A seed folder's files a row is made from: row.json records their sha256 ("made_from"), and the row
# is tabled only while they are unchanged (a row run again but interrupted leaves the old row.json).
MADE_FROM = ("logs/config_04_training.json", "logs/history.jsonl", "logs/metrics_test.json")
VERSION_KEYS = ("labeler_version", "metrics_version")  # a row is tabled only beside rows scored alike
COLUMNS = ("BLEU-4", "ROUGE-L", "CIDEr", "clinical macro_F1", "clinical micro_F1", "laterality",
           "distinct_predictions", "train_seconds")


def run_ablation(profile: str = "demo", overrides: dict | None = None, n_seeds: int = 3,
                 rows: list[str] | None = None) -> dict:
    """Train and evaluate every row for seeds ``seed .. seed + n_seeds - 1``; write the table."""
    from medexgen_lib.acquisition import acquire, build_studies_table
    from medexgen_lib.evaluate import run_evaluation
    from medexgen_lib.preprocess import run_preprocessing
    from medexgen_lib.train import train

    overrides = dict(overrides or {})
    if n_seeds < 1:  # no seed would train, and every row named would be rewritten empty
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    names = rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown ablation row(s) {unknown}; known: {list(ROWS)}")
    base = load_config(profile, overrides)
    out_root = Path(base.paths.output_dir) / "ablation"
    prepared: set[str] = set()
    for name in names:
        per_seed = []  # the row's old row.json stays until this one replaces it; write_table
        # leaves it out once a seed folder it was made from changed (made_from)
        for seed in range(base.seed, base.seed + n_seeds):
            folder = out_root / _slug(name) / f"seed_{seed}"
            settings = {**overrides, **ROWS[name], "seed": seed, "paths.output_dir": str(folder)}
            size = load_config(profile, settings).images.size
            if size != base.images.size:  # the image cache is made at one size: a data folder per size
                settings["paths.data_dir"] = f"{base.paths.data_dir}_{size}px"
            cfg = load_config(profile, settings)
            if cfg.paths.data_dir not in prepared:  # stages 01-03 once per size and invocation:
                # a folder left by a run with other data settings is brought up to these
                prep = load_config(profile, {**settings, "seed": base.seed})  # one split for all
                with folder_lock(prep.paths.output_dir), folder_lock(prep.paths.data_dir, "paths.data_dir"):
                    build_studies_table(prep, acquire(prep))  # the folders `run` locks for these stages
                    run_preprocessing(prep)
                prepared.add(cfg.paths.data_dir)
            began = time.perf_counter()
            train(cfg, progress=False)
            seconds = time.perf_counter() - began
            summary = run_evaluation(cfg, progress=False)
            per_seed.append({**summary["model"], "seed": seed, "train_seconds": seconds,
                             "retrieval": summary["baselines"][RETRIEVAL]})
            log.info("ablation %s seed %d: macro-F1 %.3f BLEU-4 %.3f (%.0f s)", name, seed,
                     summary["model"]["clinical macro_F1"], summary["model"]["BLEU-4"], seconds)
        row = {"overrides": ROWS[name], "seeds": [s["seed"] for s in per_seed],
               "scored_with": [{"seed": s["seed"], **{k: s.get(k) for k in VERSION_KEYS}} for s in per_seed],
               **{c: mean_std([s.get(c) for s in per_seed]) for c in COLUMNS},
               "retrieval": {c: mean_std([s["retrieval"].get(c) for s in per_seed])
                             for c in COLUMNS[:-1]},
               "made_from": _made_from(out_root / _slug(name), [s["seed"] for s in per_seed])}
        write_json(out_root / _slug(name) / ROW_FILE, row)
    return write_table(base, profile, overrides, n_seeds)


def write_table(base, profile: str, overrides: dict, n_seeds: int) -> dict:
    """Collect every finished row of ``<output_dir>/ablation/`` (rows may be run by separate,
    even concurrent, invocations) into ``logs/ablation.json`` and ``logs/ablation.md``: rows of
    these seeds whose every seed trained with the settings this invocation gives the row
    (``_trained_as``) and was scored by this labeler and metrics version (``_scored_otherwise``),
    and whose seed folders are still the ones the row was made from (``made_from``, where recorded);
    any other row is left out, with a warning."""
    out_root = Path(base.paths.output_dir) / "ablation"
    seeds = list(range(base.seed, base.seed + n_seeds))
    rows = {}
    for name in ROWS:
        path = out_root / _slug(name) / ROW_FILE
        if path.exists():
            row = read_json(path)
            if row.get("seeds") != seeds:
                continue
            stale = _scored_otherwise(row)
            if stale:
                log.warning("ablation row %r was scored by another labeler or metrics version (%s; now "
                            "labeler %s, metrics %s); left out: run it again", name, stale,
                            LABELER_VERSION, METRICS_VERSION)
                continue
            if "made_from" in row and row["made_from"] != _made_from(path.parent, seeds):
                log.warning("ablation row %r: a seed folder changed since %s was written (a run of the "
                            "row that did not finish); left out: run it again", name, path)
                continue
            try:
                differ = [key for seed in seeds for key in _trained_as(
                    path.parent / f"seed_{seed}", load_config(profile, {**overrides, **ROWS[name], "seed": seed}))]
            except ConfigError as exc:
                log.warning("ablation row %r does not load with these settings (%s); left out", name, exc)
                continue
            if differ:
                log.warning("ablation row %r was trained with other settings (%s); left out",
                            name, ", ".join(sorted(set(differ))[:5]))
                continue
            rows[name] = row
    result = {"profile": profile, "overrides": overrides, "n_seeds": n_seeds, "seeds": seeds,
              "rows": rows}
    write_json(base.paths.logs / "ablation.json", result)
    write_text_atomic(base.paths.logs / "ablation.md", format_table(result))
    return result


def format_table(result: dict) -> str:
    """The ablation as a Markdown table, mean ± std over seeds."""
    head = ["row", *COLUMNS, "retrieval macro_F1", "retrieval BLEU-4", "retrieval laterality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if not result["rows"]:
        return "Ablation: no finished rows yet\n"
    for name, row in result["rows"].items():
        cells = [_cell(row[c], c) for c in COLUMNS]
        cells += [_cell(row["retrieval"][c], c) for c in ("clinical macro_F1", "BLEU-4", "laterality")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return (f"Ablation, profile {result['profile']}, seeds {result['seeds']} "
            f"(mean ± std; retrieval: nearest image in that row's encoder)\n\n" + "\n".join(lines) + "\n")


def _cell(value: dict, column: str) -> str:
    if value["mean"] is None:
        return "n/a"
    digits = 0 if column == "train_seconds" else 3
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _scored_otherwise(row: dict) -> str:
    """How ``row``'s seeds were scored where that is not by this labeler and metrics version
    ("" where every seed was); a row saved before versions were recorded says "unrecorded"."""
    current = {"labeler_version": LABELER_VERSION, "metrics_version": METRICS_VERSION}
    scored = row.get("scored_with")
    if not isinstance(scored, list) or [s.get("seed") for s in scored] != row.get("seeds"):
        return "versions unrecorded"
    return ", ".join(f"seed {s['seed']}: labeler {s.get('labeler_version')}, metrics {s.get('metrics_version')}"
                     for s in scored if any(s.get(k) != v for k, v in current.items()))


def _trained_as(folder: Path, expected) -> list[str]:
    """The settings (dotted keys, ``paths.*`` aside) in which the training run in ``folder``
    (its ``logs/config_04_training.json``) differs from the config ``expected``; a setting the
    saved config lacks (added since) counts as its default. Missing or unreadable: "config"."""
    try:
        saved = flatten(read_json(folder / "logs" / "config_04_training.json"))
    except (OSError, ValueError):
        return ["config"]
    defaults = flatten(Config().to_dict())
    return [key for key, value in flatten(expected.to_dict()).items()
            if not key.startswith("paths.") and saved.get(key, defaults.get(key)) != value]


def _made_from(row_folder: Path, seeds: list[int]) -> dict[str, dict[str, str | None]]:
    """The sha256 of each seed folder's ``MADE_FROM`` files (None where missing)."""
    def digest(path: Path) -> str | None:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
    return {str(seed): {name: digest(row_folder / f"seed_{seed}" / name) for name in MADE_FROM}
            for seed in seeds}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--seeds", type=seed_count, default=3)
    parser.add_argument("--rows", nargs="+", help=f"subset of rows; known: {list(ROWS)}")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = run_ablation(args.profile, dict(args.p), args.seeds, args.rows)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
