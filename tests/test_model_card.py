"""The model card written with every exported model, and updated by evaluation."""

import json
import logging
import shutil

import pytest
from huggingface_hub import ModelCard

from medexgen_lib.model import ReportGenerator
from medexgen_lib.model_card import CARD_FILE, CARD_METRICS, FACTS_KEY, add_results, build_card


def _results(card, split):
    return {e.metric_name: e.metric_value for e in card.data.eval_results if e.dataset_split == split}


def test_exported_card_matches_the_metrics_files(trained_tiny):
    cfg = trained_tiny[0]
    card = ModelCard.load(cfg.paths.models / "final" / CARD_FILE)
    metrics = json.loads((cfg.paths.logs / "metrics_test.json").read_text())
    history = [json.loads(line) for line in (cfg.paths.logs / "history.jsonl").read_text().splitlines()]
    assert cfg.train.export == "last"
    exported = history[-1]

    assert card.data.library_name == "medexgen"
    assert card.data.datasets == ["medexgen-phantom"] and "medexgen-phantom" in card.data.tags
    assert card.data.license is None  # no patient data, no data licence to inherit
    assert {"bleu", "rouge", "cider", "f1"} <= set(card.data.metrics)
    assert _results(card, "validation") == {k: v for k, v in exported["val"].items() if k in CARD_METRICS}
    test = _results(card, "test")
    assert test == {k: metrics["model"][k] for k in CARD_METRICS if metrics["model"].get(k) is not None}
    assert set(test) >= {"BLEU-4", "ROUGE-L", "CIDEr", "clinical macro_F1"}
    facts = card.data.to_dict()[FACTS_KEY]
    assert facts["validation"]["fingerprint"] == exported["fingerprint"]
    assert set(facts["results"]["test"]["baselines"]) == set(metrics["baselines"])
    split_counts = json.loads((cfg.paths.processed / "splits.json").read_text())["meta"]["counts"]
    assert facts["data"]["split_counts"] == {k: v["studies"] for k, v in split_counts.items()}
    assert "Not for clinical use" in card.text and "It knows only the phantom" in card.text
    assert "## Test metrics, with baselines" in card.text and "retrieval" in card.text


def test_real_data_card_carries_the_iu_xray_licence(trained_tiny):
    facts = ModelCard.load(trained_tiny[0].paths.models / "final" / CARD_FILE).data.to_dict()[FACTS_KEY]
    facts["data"]["source"] = "openi"
    card = ModelCard(str(build_card(facts)))
    assert card.data.license == "cc-by-nc-nd-4.0" and card.data.datasets == ["iu-xray"]
    assert "CC BY-NC-ND 4.0" in card.text
    assert f"Trained on {facts['data']['split_counts']['train']} studies from one US hospital" in card.text


def test_from_pretrained_works_with_and_without_a_card(trained_tiny, tmp_path):
    final = trained_tiny[0].paths.models / "final"
    bare = shutil.copytree(final, tmp_path / "bare")
    (bare / CARD_FILE).unlink()
    with_card, without = ReportGenerator.from_pretrained(final), ReportGenerator.from_pretrained(bare)
    assert with_card.config == without.config
    assert add_results(bare, {}) is None and not (bare / CARD_FILE).exists()


def test_an_unreadable_card_is_left_as_it_is_with_a_warning_naming_it(trained_tiny, tmp_path, caplog):
    """A hand-edited card whose YAML no longer parses: evaluation's metrics file is already
    written, so the card update warns (naming the card) instead of failing stage 05."""
    cfg = trained_tiny[0]
    folder = shutil.copytree(cfg.paths.models / "final", tmp_path / "edited")
    broken = "---\nlicense: [\n---\n# my notes\n"
    (folder / CARD_FILE).write_text(broken)
    summary = json.loads((cfg.paths.logs / "metrics_test.json").read_text())
    with caplog.at_level(logging.WARNING, logger="medexgen_lib.model_card"):
        assert add_results(folder, summary) is None
    assert (folder / CARD_FILE).read_text() == broken
    assert any(str(folder / CARD_FILE) in r.getMessage() and "metrics_test.json" in r.getMessage()
               for r in caplog.records)


@pytest.mark.reliability
def test_a_card_whose_medexgen_facts_lack_a_section_is_left_as_it_is(tmp_path, caplog):
    """A hand-edited card without ``medexgen.data`` crashed stage 05 (KeyError: 'data') after
    the metrics were written; it is left as it is, with a warning naming it."""
    edited = ("---\nlibrary_name: medexgen\nmedexgen:\n  results: {}\n  model: {encoder: resnet18}\n"
              "---\n# notes\n")
    (tmp_path / CARD_FILE).write_text(edited)
    summary = {"split": "test", "n": 3, "decode": {"num_beams": 1}, "model": {"BLEU-4": 0.2},
               "baselines": {"constant (most frequent)": {"BLEU-4": 0.1}}}
    with caplog.at_level(logging.WARNING, logger="medexgen_lib.model_card"):
        assert add_results(tmp_path, summary) is None
    assert (tmp_path / CARD_FILE).read_text() == edited
    assert any(str(tmp_path / CARD_FILE) in r.getMessage() and "metrics_test.json" in r.getMessage()
               and "'data'" in r.getMessage() for r in caplog.records)


@pytest.mark.reliability
def test_a_card_nested_too_deep_to_parse_is_left_as_it_is(tmp_path, caplog):
    """A card whose YAML is nested 3000 levels deep crashed stage 05 (RecursionError) after the
    metrics were written."""
    deep = "---\nlibrary_name: medexgen\nmedexgen: " + "[" * 3000 + "]" * 3000 + "\n---\n# notes\n"
    (tmp_path / CARD_FILE).write_text(deep)
    summary = {"split": "test", "n": 3, "decode": {"num_beams": 1}, "model": {"BLEU-4": 0.2},
               "baselines": {}}
    with caplog.at_level(logging.WARNING, logger="medexgen_lib.model_card"):
        assert add_results(tmp_path, summary) is None
    assert (tmp_path / CARD_FILE).read_text() == deep
    assert any(f"model card {tmp_path / CARD_FILE} is unreadable" in r.getMessage()
               and "metrics_test.json" in r.getMessage() for r in caplog.records)
