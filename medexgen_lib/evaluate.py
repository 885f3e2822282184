"""Stage 05: the model's reports for a split (``reporting.generate_reports``), baselines, scored
outputs, and scoring of any predictions file with the same metrics."""

from __future__ import annotations

import io
import re
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medexgen_lib.dataset import ReportDataset, collate
from medexgen_lib.features import FrozenFeatures
from medexgen_lib.files import read_capped, read_json, save_figure, write_json
from medexgen_lib.metrics import R2GEN_CONVENTIONS, has_words
from medexgen_lib.progress import progress_log
from medexgen_lib.reporting import decode_settings, generate_reports
from medexgen_lib.splits import SOURCES_WITH_SPLIT


# --------------------------------------------------------------------------- stage 05

# Published IU X-Ray test results (R2Gen split and normalisation, both views, full data).
PUBLISHED_IU_XRAY = {
    "R2Gen (Chen et al., 2020)": {"BLEU-1": 0.470, "BLEU-2": 0.304, "BLEU-3": 0.219,
                                  "BLEU-4": 0.165, "METEOR": 0.187, "ROUGE-L": 0.371},
    "R2GenCMN (Chen et al., 2021)": {"BLEU-1": 0.475, "BLEU-2": 0.309, "BLEU-3": 0.222,
                                     "BLEU-4": 0.170, "METEOR": 0.191, "ROUGE-L": 0.375},
}
PUBLISHED_NOTE = ("Comparable only on the real data with split.annotation_file set to R2Gen's "
                  "annotation.json, both views and this (R2Gen) normalisation; on the phantom set or "
                  "another split the numbers measure something else.")
# How the published numbers were obtained (R2Gen's code and paper).
PUBLISHED_SETTINGS = {"target": "findings", "split": "R2Gen annotation.json (2069/296/590 studies)",
                      "normalisation": "R2Gen clean_report_iu_xray",
                      "references": "r2gen (<= 59 words, words seen < 3 times in training as <unk>)"}
R2GEN_SPLIT_SIZES = {"train": 2069, "val": 296, "test": 590}
TABLE_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                 "clinical macro_F1", "clinical macro_F1 (observations in references)",
                 "clinical micro_F1", "clinical example_F1", "clinical abnormal_recall",
                 "laterality", "distinct_predictions", "degenerate_predictions",
                 "reports_changed_by_post_processing",
                 "drawn_recall", "drawn_precision", "drawn_finding_free_studies", "drawn_missed_studies",
                 "drawn_studies")


def comparability(cfg, split_meta: dict, evaluated: str = "test") -> tuple[dict, list[str]]:
    """This run's target, split (and which part of it was scored, ``evaluated``), normalisation and
    reference convention, and a warning for each way they differ from how the published IU X-Ray
    numbers were obtained (``PUBLISHED_SETTINGS``: test studies)."""
    from medexgen_lib.metrics import NORMALISATION

    counts = {name: c.get("studies") for name, c in split_meta.get("counts", {}).items()}
    settings = {"data": cfg.data.source, "target": cfg.text.target, "split": split_meta.get("source", "unknown"),
                "split_sizes": counts, "scored": evaluated, "normalisation": NORMALISATION,
                "references": cfg.eval.references}
    warnings = []
    if evaluated != "test":
        warnings.append(f"scored on the {evaluated} split; published numbers are on the test split")
    if cfg.data.source == "phantom":
        warnings.append("phantom data: these numbers are not about IU X-Ray at all")
    if cfg.data.source == "mimic":
        warnings.append("MIMIC-CXR data: the published numbers beside these are IU X-Ray's")
    if cfg.text.target != "findings":
        warnings.append(f"target is {cfg.text.target}; published results score FINDINGS only")
    own_split = not cfg.split.annotation_file and cfg.data.source in SOURCES_WITH_SPLIT  # the data set's split
    if not cfg.split.annotation_file and not own_split:
        warnings.append(f"split is this project's ({settings['split']}), not R2Gen's annotation.json")
    elif counts != R2GEN_SPLIT_SIZES:
        where = f"the {cfg.data.source} source" if own_split else cfg.split.annotation_file
        warnings.append(f"split from {where} has {counts} studies, R2Gen's has {R2GEN_SPLIT_SIZES}")
    if cfg.eval.references not in R2GEN_CONVENTIONS:
        warnings.append("references are full length; published numbers used R2Gen's (<= 59 words, rare "
                        "words as <unk>): set eval.references r2gen")
    return settings, warnings


@torch.no_grad()
def study_embeddings(model, data: ReportDataset, batch_size: int = 32, device="cpu", features=None) -> torch.Tensor:
    """One L2-normalised vector per study: mean of its visual tokens (the model's encoder space).
    ``features``: uids -> the encoder's feature maps, computed before (see ``generate_reports``)."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False,
                        collate_fn=partial(collate, pad_token_id=model.config.pad_token_id))
    vectors = []
    for batch in loader:
        known = features(batch["uids"]) if features is not None else None
        tokens, mask = model.encode(batch["images"].to(device), batch["view_mask"].to(device), known)
        weights = mask.unsqueeze(-1).float()
        vectors.append(((tokens * weights).sum(1) / weights.sum(1)).cpu())
    return torch.nn.functional.normalize(torch.cat(vectors), dim=1)


def baseline_predictions(model, train_data: ReportDataset, val_data: ReportDataset,
                         eval_data: ReportDataset, device="cpu", eval_features=None) -> dict[str, list[str]]:
    """Predictions of the baselines for ``eval_data`` (``eval_features``: its feature maps by uid,
    computed before).

    constant (most frequent): the most frequent training report;
    constant (best of top 50 on val): of the 50 most frequent, the best val BLEU-4;
    retrieval (nearest image): the report of the nearest training study in encoder space.
    """
    from collections import Counter

    from medexgen_lib.planning import normal_report

    train_texts = [e.text for e in train_data.examples]
    most_frequent = Counter(train_texts).most_common(1)[0][0]
    best = normal_report(train_texts, [e.text for e in val_data.examples])
    train_vectors = study_embeddings(model, train_data, device=device)
    eval_vectors = study_embeddings(model, eval_data, device=device, features=eval_features)
    nearest = (eval_vectors @ train_vectors.T).argmax(dim=1).tolist()
    n = len(eval_data)
    return {"constant (most frequent)": [most_frequent] * n,
            "constant (best of top 50 on val)": [best] * n,
            "retrieval (nearest image)": [train_texts[i] for i in nearest]}


def run_evaluation(cfg, model_dir=None, split: str = "test", progress: bool = True) -> dict:
    """Generate for ``split``, score model and baselines, write predictions and metrics JSON."""
    import hashlib
    import time

    from medexgen_lib.labeler import label_report
    from medexgen_lib.metrics import (diversity, laterality, load_phantom_truth, per_sample_text_scores,
                                      prediction_labels, score)
    from medexgen_lib.model import ReportGenerator
    from medexgen_lib.model_card import add_results
    from medexgen_lib.preprocess import load_split
    from medexgen_lib.realtext import TRUTH_FILE as DRAWN_TRUTH_FILE
    from medexgen_lib.realtext import load_truth, stated_findings

    began = time.perf_counter()
    model_dir = Path(model_dir) if model_dir else cfg.paths.models / "final"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ReportGenerator.from_pretrained(model_dir, device=device)
    data = load_split(cfg, split)
    train_data, val_data = load_split(cfg, "train"), load_split(cfg, "val")
    # the split's images encoded once, for the model's reports and for retrieval's search
    features = FrozenFeatures(model, data, partial(collate, pad_token_id=model.config.pad_token_id),
                              device, cfg.eval.batch_size)
    rows = generate_reports(model, data, cfg.eval, device, progress, features)
    references = [r["reference"] for r in rows]
    predictions = [r["prediction"] for r in rows]
    train_texts = [e.text for e in train_data.examples]
    options = {"meteor": cfg.eval.meteor, "uncertain_as_positive": cfg.eval.uncertain_as_positive,
               "reference_convention": cfg.eval.references, "training_reports": train_texts}

    truth = load_phantom_truth(cfg.paths.reports)  # None on real data
    drawn = load_truth(cfg.paths.reports) if (cfg.paths.reports / DRAWN_TRUTH_FILE).exists() else None
    uids = [r["uid"] for r in rows]

    def image_truth_scores(texts: list[str]) -> dict:
        """Sides (phantom) and drawn findings stated (real-text phantom) where the data have them."""
        return {**(laterality(truth, uids, texts) if truth is not None else {}),
                **(stated_findings(dict(zip(uids, texts)), drawn) if drawn is not None else {})}

    metrics = score(references, predictions, **options, decoder_texts=[r["decoder_text"] for r in rows])
    metrics.update(diversity(predictions, train_texts))
    metrics.update(image_truth_scores(predictions))
    baselines = {}
    for name, guesses in baseline_predictions(model, train_data, val_data, data, device, features).items():
        baselines[name] = {**score(references, guesses, **options), **diversity(guesses, train_texts),
                           **image_truth_scores(guesses)}
        for row, guess in zip(rows, guesses):
            row.setdefault("baseline_predictions", {})[name] = guess
    for row in rows:
        row.update(per_sample_text_scores(row["reference"], row["prediction"]))
        row["reference_labels"] = label_report(row["reference"])
        row["prediction_labels"] = prediction_labels(row["prediction"], row["decoder_text"])
    weights = (model_dir / "model.safetensors").read_bytes()
    settings, warnings = comparability(cfg, read_json(cfg.paths.processed / "splits.json").get("meta", {}), split)
    warnings += metrics["warnings"]
    note = PUBLISHED_NOTE + "".join(f"\nWARNING: {w}" for w in warnings)
    summary = {"split": split, "n": len(rows), "model": metrics, "baselines": baselines,
               "published": PUBLISHED_IU_XRAY, "published_note": note, "published_settings": PUBLISHED_SETTINGS,
               "comparability": settings, "warnings": warnings, "references": metrics["references"],
               "reference_convention": metrics["reference_convention"],
               "normalisation": metrics["normalisation"], "decode": decode_settings(cfg.eval),
               "seed": cfg.seed, "model_dir": str(model_dir), "model_sha256": hashlib.sha256(weights).hexdigest(),
               "seconds": time.perf_counter() - began}
    write_json(cfg.paths.logs / f"predictions_{split}.json", rows)
    write_json(cfg.paths.logs / f"metrics_{split}.json", summary)
    add_results(model_dir, summary)  # the model card shows test metrics beside the baselines
    progress_log.info("%s split: %d studies scored in %.0f s: BLEU-4 %.4f, clinical macro_F1 %.4f; %d degenerate "
                      "decoder texts, %d reports changed by side words / sentence bank", split, len(rows),
                      summary["seconds"], metrics["BLEU-4"], metrics["clinical macro_F1"],
                      metrics["degenerate_predictions"], metrics["reports_changed_by_post_processing"])
    return summary


def comparison_table(summary: dict):
    """One table: the model, the baselines and published IU X-Ray results, by metric.

    Its ``note`` column states each row's setting; on the published rows it carries every
    mismatch with this run (``summary["warnings"]``), also kept in ``table.attrs["warnings"]``.
    """
    import pandas as pd

    rows = {"model": summary["model"], **summary["baselines"], **summary["published"]}
    table = pd.DataFrame({name: {m: values.get(m) for m in TABLE_METRICS} for name, values in rows.items()}).T
    table = table.dropna(axis=1, how="all")
    settings = summary.get("comparability", {})
    ours = ", ".join(f"{k} {settings[k]}" for k in ("data", "target", "split", "scored", "references")
                     if k in settings)
    warnings = summary.get("warnings", ["no record of this run's target, split or references"])
    published = "; ".join(f"{k} {v}" for k, v in PUBLISHED_SETTINGS.items())
    verdict = ("NOT COMPARABLE: " + "; ".join(warnings)) if warnings else \
        "same target, split, normalisation and reference convention (vocabulary from this run's text)"
    table["note"] = [f"this run: {ours}" if name not in summary["published"] else f"{published}. {verdict}"
                     for name in table.index]
    table.attrs["warnings"] = list(warnings)
    return table


def plot_observation_f1(summary: dict, path: Path) -> Path:
    """Per-observation F1 of the model, nearest-image retrieval and the constant (most frequent)
    report, with reference support."""
    import matplotlib.pyplot as plt

    model = summary["model"]["clinical per_observation"]
    constant = summary["baselines"]["constant (most frequent)"]["clinical per_observation"]
    retrieval = summary["baselines"]["retrieval (nearest image)"]["clinical per_observation"]
    names = [o for o in model if model[o]["support"] > 0 or model[o]["predicted"] > 0]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(names) + 1.5))
    y = range(len(names))
    for offset, (label, values) in zip((-0.27, 0, 0.27), (("model", model), ("retrieval", retrieval),
                                                          ("constant report", constant))):
        ax.barh([i + offset for i in y], [values[o]["f1"] for o in names], height=0.26, label=label)
    ax.set_yticks(list(y), [f"{o} (n={model[o]['support']})" for o in names])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="F1 (positive class)", title=f"Clinical F1 per observation, {summary['split']} split")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


_IMAGE_SUFFIX = re.compile(r"_IM-[0-9]+(-[0-9]+)?$")  # IU X-Ray image id = study uid + this


MAX_PREDICTIONS_BYTES = 256 * 2**20  # stage 05's predictions of a test split are a few MB


def read_predictions_file(path, field: str = "prediction") -> list[dict]:
    """Rows of ``{"uid", "prediction"[, "reference"]}`` from a CSV or JSON predictions file; the
    prediction is read from the column ``field`` (e.g. ``decoder_text`` of stage 05's predictions:
    the decoder's own text before post-processing).

    Accepted: JSON (a list of objects, as ``logs/predictions_<split>.json``) or CSV with a
    header; the id column may be called ``uid`` or ``id`` (R2Gen ids like
    ``CXR1573_IM-0374`` or image ids ``CXR1573_IM-0374-1001`` are reduced to the study uid;
    only that ``_IM-...`` suffix is cut, other underscores belong to the uid).
    """
    import csv
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    try:
        data = read_capped(path, MAX_PREDICTIONS_BYTES)  # a link to /dev/zero, a FIFO: refused
    except ValueError as exc:
        raise ValueError(f"predictions file {exc}") from None
    try:  # utf-8-sig: the byte order mark Excel writes before a CSV header is not part of 'uid'
        text = data.decode("utf-8-sig")
        if path.suffix.lower() == ".json":
            records = json.loads(text)
        else:
            records = list(csv.DictReader(io.StringIO(text, newline="")))
    except (ValueError, csv.Error, RecursionError) as exc:  # bad UTF-8 or JSON, > 4300 digits, too deep
        raise ValueError(f"cannot read predictions file {path}: {exc}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"predictions file {path} holds no rows")
    rows = []
    for number, record in enumerate(records, 1):
        uid = record.get("uid") or record.get("id") if isinstance(record, dict) else None
        if not uid or field not in record:
            raise ValueError(f"predictions file {path}, row {number}: needs an 'uid' (or 'id') "
                             f"and a {field!r}")
        uid = _IMAGE_SUFFIX.sub("", str(uid))
        where = f"predictions file {path}, row {number} ({uid})"
        prediction, reference = record[field], record.get("reference")
        for name, value in (("prediction", prediction), ("reference", reference)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {name!r} must be text, got {type(value).__name__}")
        if reference is not None and not reference.strip():
            raise ValueError(f"{where}: the 'reference' is empty, and an empty cell is not a "
                             "reference; fill it in, or leave the column out to take references from "
                             "the studies table")
        if reference is not None and not has_words(reference):
            raise ValueError(f"{where}: the 'reference' {reference[:80]!r} has no words once cleaned for "
                             "scoring (punctuation, 'XXXX' or invisible characters only), so it is not a "
                             "reference; fill it in, or leave the column out to take references from the "
                             "studies table")
        rows.append({"uid": uid, "prediction": prediction or "", "reference": reference})
    return rows


def score_predictions_file(path, cfg, meteor: bool = False, split: str = "test",
                           field: str = "prediction") -> dict:
    """Score any model's predictions file with the project's metrics (the predictions in the
    column ``field``).

    References come from the file when it has a ``reference`` column, else from
    the studies table (cleaned target text per ``cfg.text``); the result says which
    (``references_from``) and under which convention (``cfg.eval.references``).
    Duplicate ids are refused; ids of ``split`` the file lacks, and ids outside it,
    are counted in ``coverage`` and named in ``warnings``.
    """
    from collections import Counter

    from medexgen_lib.metrics import score
    from medexgen_lib.reports import load_studies_table
    from medexgen_lib.splits import SPLITS, load_splits
    from medexgen_lib.text import target_texts

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rows = read_predictions_file(path, field)
    repeats = {uid: n for uid, n in Counter(r["uid"] for r in rows).items() if n > 1}
    if repeats:
        raise ValueError(f"predictions file {path}: {len(repeats)} id(s) appear more than once "
                         f"({sum(repeats.values()) - len(repeats)} extra rows), e.g. {list(repeats)[:3]}; "
                         "keep one prediction per study")
    splits_path = cfg.paths.processed / "splits.json"
    splits = load_splits(splits_path) if splits_path.exists() else None
    given = sum(r["reference"] is not None for r in rows)
    from_file = given == len(rows)
    reference_of: dict[str, str] = {}
    if not from_file or cfg.eval.references in R2GEN_CONVENTIONS:
        table = load_studies_table(cfg.paths.studies_table)
        reference_of = dict(zip(table["uid"], target_texts(table, cfg.text.target, cfg.text.lowercase)))
    unknown = [r["uid"] for r in rows if r["reference"] is None and r["uid"] not in reference_of]
    if unknown:
        raise ValueError(f"predictions file {path}: {len(unknown)} id(s) not in the studies table "
                         f"{cfg.paths.studies_table}, e.g. {unknown[:3]}")
    for r in rows:
        if r["reference"] is None:
            r["reference"] = reference_of[r["uid"]]
    training_reports = None
    if cfg.eval.references in R2GEN_CONVENTIONS:
        if splits is None:
            raise FileNotFoundError(f"eval.references {cfg.eval.references} needs the training reports for R2Gen's vocabulary: "
                                    f"{splits_path} not found; run notebook 03_preprocessing first")
        training_reports = [reference_of[u] for u in splits["train"] if u in reference_of]
    metrics = score([r["reference"] for r in rows], [r["prediction"] for r in rows], meteor=meteor,
                    uncertain_as_positive=cfg.eval.uncertain_as_positive,
                    reference_convention=cfg.eval.references, training_reports=training_reports)
    metrics["references_from"] = (
        f"{given} from the file's 'reference' column, {len(rows) - given} from the studies table "
        f"{cfg.paths.studies_table} (text.target {cfg.text.target}, cleaned with text.clean_report)")
    warnings = list(metrics["warnings"])
    if splits is None:
        metrics["coverage"] = None
        warnings.append(f"coverage not checked: {splits_path} not found")
    else:
        expected, ids = set(splits[split]), {r["uid"] for r in rows}
        metrics["coverage"] = {"split": split, "studies_in_split": len(expected), "scored": len(rows),
                               "missing": len(expected - ids), "outside_split": len(ids - expected)}
        if expected - ids:
            warnings.append(f"{len(expected - ids)} of the {len(expected)} {split} studies have no prediction, "
                            f"e.g. {sorted(expected - ids)[:3]}; the scores cover {len(ids & expected)} of them")
        if ids - expected:
            warnings.append(f"{len(ids - expected)} scored id(s) are not in the {split} split, "
                            f"e.g. {sorted(ids - expected)[:3]}")
    metrics["warnings"] = warnings
    return metrics
