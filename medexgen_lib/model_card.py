"""A Hugging Face model card (``README.md``) with every exported model.

Training's export writes ``models/final/README.md``: YAML metadata (library,
tags, datasets, metrics, ``model-index`` results) and sections on the
architecture, training data and split, text target and normalisation, the
exported epoch's validation metrics and evaluation fingerprint, licence, intended
use and limitations. Evaluation (stage 05) rebuilds the card with the test
metrics and the baselines beside them. The facts behind the card are kept in its
metadata under ``medexgen``, so an update rebuilds the whole card from them
rather than editing text. Built with ``huggingface_hub``'s ``ModelCard`` and
``ModelCardData``, so ``ModelCard.load`` and the Hub read it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from medexgen_lib.config import Config
from medexgen_lib.files import read_capped, read_json, write_text_atomic
from medexgen_lib.metrics import NORMALISATION

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
FACTS_KEY = "medexgen"
MAX_CARD_BYTES = 16 * 2**20  # a card is a few kB
CARD_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                "clinical macro_F1", "clinical micro_F1", "clinical example_F1",
                "clinical abnormal_recall")
# id (Hub metadata), short name (titles), full name
DATASETS = {"phantom": ("medexgen-phantom", "phantom", "MedExGen phantom chest X-rays (synthetic)"),
            "real": ("iu-xray", "IU X-Ray", "IU X-Ray (Indiana University chest X-ray collection, Open-i)")}
IU_XRAY_LICENCE = ("The IU X-Ray collection (Demner-Fushman et al., 2016; Open-i, National Library of "
                   "Medicine) is licensed CC BY-NC-ND 4.0 (attribution, non-commercial, no derivatives). "
                   "The card's metadata carries that licence; check its terms before sharing this model.")
LIMITATIONS = {
    "phantom": ("This model was trained on MedExGen's synthetic phantom radiographs only. It knows "
                "only the phantom's drawn findings and says nothing meaningful about real X-rays; it "
                "exists to check the pipeline end to end."),
    "real": ("Trained on {n_train} studies from one US hospital network; reports follow that "
             "institution's style. Automatic metrics (BLEU, ROUGE, CIDEr) reward wording, and the "
             "clinical F1 comes from a rule-based labeler, not from radiologists; neither establishes "
             "clinical correctness."),
}


def _metric_type(name: str) -> str:
    """The Hub's metric id for one of our metric names."""
    if name.startswith("BLEU"):
        return "bleu"
    if name.startswith("clinical"):
        return "f1" if name.endswith("F1") else "recall"
    return name.split("-")[0].lower()


def export_facts(cfg: Config, model, record: dict, split_meta: dict) -> dict:
    """What the card says about a freshly exported model (JSON-able).

    ``record`` is the exported epoch's line of ``history.jsonl``; ``split_meta``
    the ``meta`` of ``processed/splits.json`` (split source and counts).
    """
    config = model.config
    data = {"source": cfg.data.source, "split_source": split_meta.get("source", "unknown"),
            "split_counts": {name: counts["studies"] for name, counts in split_meta.get("counts", {}).items()}}
    if cfg.data.source == "phantom":
        data.update(n_phantom_studies=cfg.data.n_phantom_studies, phantom_seed=cfg.data.phantom_seed)
    return {
        "model": {"encoder": config.encoder, "encoder_init": config.encoder_init,
                  "decoder_init": config.decoder_init, "image_size": config.image_size,
                  "n_views": config.n_views, "n_layer": config.n_layer, "n_head": config.n_head,
                  "n_embd": config.n_embd, "vocab_size": config.vocab_size,
                  "parameters": {k.strip(): v for k, v in model.parameter_summary().items()}},
        "data": data,
        "text": {"target": cfg.text.target, "lowercase": cfg.text.lowercase,
                 "max_length": cfg.text.max_length, "normalisation": NORMALISATION},
        "validation": {"epoch": record["epoch"], "export": cfg.train.export,
                       "selection_metric": record["selection_metric"],
                       "selection_value": record["selection_value"],
                       "fingerprint": record["fingerprint"], "metrics": dict(record["val"])},
        "results": {},
    }


def build_card(facts: dict) -> ModelCard:
    """The model card for ``facts`` (as ``export_facts`` makes them, plus any split results)."""
    kind = "phantom" if facts["data"]["source"] == "phantom" else "real"
    dataset_id, short_name, dataset_name = DATASETS[kind]
    evals = [EvalResult(task_type="image-to-text", dataset_type=dataset_id, dataset_name=dataset_name,
                        dataset_split=split, metric_type=_metric_type(name), metric_name=name,
                        metric_value=value)
             for split, metrics in [("validation", facts["validation"]["metrics"]),
                                    *((s, r["model"]) for s, r in facts["results"].items())]
             for name, value in metrics.items() if name in CARD_METRICS and value is not None]
    data = ModelCardData(
        library_name="medexgen", pipeline_tag="image-to-text", language="en",
        license="cc-by-nc-nd-4.0" if kind == "real" else None,
        tags=["radiology-report-generation", "chest-x-ray", "medical", "resnet", "gpt2", dataset_id],
        datasets=[dataset_id], metrics=sorted({e.metric_type for e in evals}),
        model_name=f"MedExGen ReportGenerator ({short_name})", eval_results=evals,
        **{FACTS_KEY: facts})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(facts, kind, short_name, dataset_name)}")


def _table(columns: dict[str, dict], rows: tuple[str, ...]) -> str:
    """Markdown table: one row per metric, one column per named result."""
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in rows:
        values = [c.get(metric) for c in columns.values()]
        if any(v is not None for v in values):
            lines.append(f"| {metric} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def _body(facts: dict, kind: str, short_name: str, dataset_name: str) -> str:
    m, d, t, v = facts["model"], facts["data"], facts["text"], facts["validation"]
    params = "\n".join(f"| {name} | {count:,} |" for name, count in m["parameters"].items())
    counts = ", ".join(f"{name} {n}" for name, n in d["split_counts"].items())
    source = (f"MedExGen's phantom set: {d['n_phantom_studies']} synthetic studies generated with seed "
              f"{d['phantom_seed']}" if kind == "phantom" else f"{dataset_name}, data source `{d['source']}`")
    sections = [
        f"# MedExGen ReportGenerator ({short_name})",
        "Writes a chest X-ray report (text) from a frontal and a lateral radiograph. Trained with "
        "MedExGen; load it with "
        "`medexgen_lib.model.ReportGenerator.from_pretrained(<this folder>)`.",
        "## Architecture and sizes",
        f"{m['encoder']} image encoder ({m['encoder_init']}) on {m['image_size']} px images, "
        f"{m['n_views']} views -> grid features -> one linear projection -> GPT-2 decoder "
        f"({m['decoder_init']}; {m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']}, "
        f"vocabulary {m['vocab_size']}) attending to the visual tokens through cross-attention.\n\n"
        f"| component | parameters |\n|---|---|\n{params}",
        "## Training data and split",
        f"{source}. Split: `{d['split_source']}` (studies: {counts}). Validation scores below are on the "
        "val split; test scores on the test split, read once.",
        "## Text target and normalisation",
        f"Target: {t['target']} (lowercase: {t['lowercase']}, at most {t['max_length']} tokens). "
        f"Metrics are computed on normalised text: {t['normalisation']}.",
        "## Validation metrics of the exported epoch",
        (f"Epoch {v['epoch']}, chosen by {v['selection_metric']} = {v['selection_value']:.4f}; "
         if v.get("export", "best") == "best" else
         f"Epoch {v['epoch']}, the last trained (`train.export` last; its {v['selection_metric']} = "
         f"{v['selection_value']:.4f}); ") +
        f"evaluation fingerprint `{v['fingerprint']}` (validation settings frozen for the run).\n\n"
        + _table({"val": v["metrics"]}, CARD_METRICS),
    ]
    for split, result in facts["results"].items():
        sections += [f"## {split.capitalize()} metrics, with baselines",
                     f"{result['n']} studies; decoding: "
                     + ", ".join(f"{k}={v}" for k, v in result["decode"].items()) + ".\n\n"
                     + _table({"model": result["model"], **result["baselines"]}, CARD_METRICS)]
    if not facts["results"]:
        sections += ["## Test metrics", "Not evaluated yet: notebook 05_evaluation adds them here."]
    sections += [
        "## Data licence",
        IU_XRAY_LICENCE if kind == "real" else
        "Synthetic data generated by MedExGen; no patient data was used.",
        "## Intended use and limitations",
        "Research and education only. **Not for clinical use**: not a medical device, not validated "
        "for diagnosis, and its reports must not inform patient care. "
        + LIMITATIONS[kind].format(n_train=d["split_counts"].get("train", "an unknown number of")),
    ]
    return "\n\n".join(sections) + "\n"


def export_card_text(cfg: Config, model, record: dict) -> str:
    """The card text for ``models/final`` at export (``split_meta`` from ``processed/splits.json``)."""
    split_meta = read_json(cfg.paths.processed / "splits.json").get("meta", {})
    return str(build_card(export_facts(cfg, model, record, split_meta)))


def _card_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in CARD_METRICS if metrics.get(k) is not None}


def card_data(path: str | os.PathLike) -> dict:
    """The metadata of the model card at ``path``, read capped (``MAX_CARD_BYTES``).
    ``ValueError`` naming the card where it is not a regular file, too large, or its YAML
    cannot be read (broken, or nested too deep for the parser)."""
    try:
        return ModelCard(read_capped(path, MAX_CARD_BYTES).decode("utf-8")).data.to_dict()
    except (ValueError, KeyError, TypeError, yaml.YAMLError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"model card {path} is unreadable ({reason})") from None


def exported_epoch(model_dir: str | os.PathLike) -> int | None:
    """The training epoch exported to ``model_dir``, as its MedExGen card says (None: no card,
    or one that does not say)."""
    path = Path(model_dir) / CARD_FILE
    try:
        epoch = card_data(path)[FACTS_KEY]["validation"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return epoch if isinstance(epoch, int) else None


def add_results(model_dir: str | os.PathLike, summary: dict) -> Path | None:
    """Rebuild ``model_dir``'s card with an evaluation's results (``metrics_<split>.json``'s
    content): model metrics and baselines. A folder without a MedExGen card is left alone."""
    path = Path(model_dir) / CARD_FILE
    if not path.exists():
        log.info("%s has no model card; test metrics are in the metrics file only", model_dir)
        return None
    try:
        facts = card_data(path).get(FACTS_KEY)
    except ValueError as exc:
        # A hand-edited card: the metrics file, already written, stays the record.
        log.warning("%s; left as it is: the %s metrics are in metrics_%s.json only", exc, summary["split"],
                    summary["split"])
        return None
    if not isinstance(facts, dict) or not isinstance(facts.get("results"), dict):
        log.info("%s is not a MedExGen model card; left as it is", path)
        return None
    facts["results"][summary["split"]] = {
        "n": summary["n"], "decode": summary["decode"], "model": _card_metrics(summary["model"]),
        "baselines": {name: _card_metrics(values) for name, values in summary["baselines"].items()}}
    try:
        text = str(build_card(facts))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # facts edited by hand
        log.warning("model card %s lacks what MedExGen rebuilds it from (%s %s); left as it is: the %s "
                    "metrics are in metrics_%s.json only", path, type(exc).__name__, exc, summary["split"],
                    summary["split"])
        return None
    return write_text_atomic(path, text)
