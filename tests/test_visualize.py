"""Stage 06: figures, attention maps and the inspector widget (built without a browser)."""

import json

import pytest
import torch

from medexgen_lib.inspector import ALL, NO_WORD, PredictionInspector, word_diff_html
from medexgen_lib.visualize import (cross_attention_maps, label_comparison, token_positions,
                                    visualize_attention, visualize_label_agreement,
                                    visualize_model_predictions, visualize_report_lengths,
                                    visualize_training_summary)


def test_training_summary_marks_best_exported_and_flagged_epochs(trained_tiny, tmp_path):
    cfg, *_ = trained_tiny
    history = [json.loads(l) for l in (cfg.paths.logs / "history.jsonl").read_text().splitlines()]
    history[1]["fingerprint_ok"] = False
    for h in history:  # epoch 1 best on val, the last one exported with train.export "last"
        h["best"] = h["epoch"] == 1
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    # the exported epoch is read from the model's card (the demo's: the last one)
    for model_dir, marks in ((None, ["best on val (epoch 1)"]), (tmp_path, ["best on val (epoch 1)"]),
                             (cfg.paths.models / "final", ["best on val (epoch 1)", f"exported (epoch {len(history)})"])):
        fig = visualize_training_summary(tmp_path, tmp_path / "summary.png", model_dir)
        assert (tmp_path / "summary.png").stat().st_size > 10_000
        metric_ax = fig.axes[1]
        assert len(metric_ax.patches) == 1  # the flagged epoch's shading
        legend = [t.get_text() for t in metric_ax.get_legend().get_texts()]
        assert [text for text in legend if "epoch" in text] == marks


def test_label_comparison():
    ref = {"Cardiomegaly": "positive", "Pleural Effusion": "positive", "Edema": "negative"}
    pred = {"Cardiomegaly": "positive", "Edema": "positive", "Pleural Effusion": "uncertain"}
    assert label_comparison(ref, pred) == {"Cardiomegaly": "agree", "Pleural Effusion": "missed",
                                           "Edema": "invented"}


def test_gallery_and_label_and_length_plots(trained_tiny, tmp_path):
    cfg, model, _, rows = trained_tiny
    visualize_model_predictions(cfg.paths.models / "final", "test", 3, 0, cfg, tmp_path / "gallery.png")
    visualize_label_agreement(rows, tmp_path / "labels.png")
    visualize_report_lengths(rows, tmp_path / "lengths.png")
    for name in ("gallery.png", "labels.png", "lengths.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_attention_maps_are_distributions_over_unmasked_views(trained_tiny, tmp_path):
    cfg, model, data, rows = trained_tiny
    item = data[0]
    token_ids = model.tokenizer.encode(rows[0]["prediction"] or "No effusion.", add_special_tokens=False)
    from medexgen_lib.images import normalize
    maps = cross_attention_maps(model, normalize(item["pixels"]), torch.tensor([True, True]), token_ids)
    assert maps.shape == (len(token_ids), 2, 2, 2)
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), torch.ones(len(token_ids)), atol=1e-4)
    frontal_only = cross_attention_maps(model, normalize(item["pixels"]), torch.tensor([True, False]), token_ids)
    assert frontal_only[:, 1].abs().max() < 1e-6
    assert model.decoder.config._attn_implementation == "sdpa"  # restored after the eager pass
    fig = visualize_attention(model, item["pixels"], item["view_mask"], token_ids,
                              model.tokenizer.decode(token_ids[:1]).strip(), out_path=tmp_path / "a.png")
    assert (tmp_path / "a.png").exists() and len(fig.axes) == 2


def test_token_positions_find_a_phrase(trained_tiny):
    _, model, _, _ = trained_tiny
    ids = model.tokenizer.encode("Small left pleural effusion.", add_special_tokens=False)
    positions = token_positions(model.tokenizer, ids, "pleural effusion")
    assert model.tokenizer.decode([ids[i] for i in positions]).strip() == "pleural effusion"
    with pytest.raises(ValueError, match="not in the generated report"):
        token_positions(model.tokenizer, ids, "pneumothorax")


def test_word_diff_marks_changes():
    out = word_diff_html("No left effusion.", "No right effusion.")
    assert "<del" in out and "left" in out and "<ins" in out and "right" in out


def test_inspector_controls_change_what_it_shows(trained_tiny):
    cfg, model, data, rows = trained_tiny
    inspector = PredictionInspector(rows, data, model, cfg.eval)
    assert len(inspector.visible) == len(rows)
    first = inspector.current
    assert first["uid"] in inspector.header.value
    assert all(v.value[:4] == b"\x89PNG" for v in inspector.views)
    assert "Reference:" in inspector.text.value and "BLEU-4" in inspector.scores.value

    inspector.order.value = "worst BLEU-4 first"
    shown = [inspector.rows[i]["BLEU-4"] for i in inspector.visible]
    assert shown == sorted(shown)

    observation = next(o for o in inspector.observation.options if o != ALL)
    inspector.observation.value = observation
    for i in inspector.visible:
        labels = inspector.rows[i]
        assert "positive" in (labels["reference_labels"][observation], labels["prediction_labels"][observation])
    inspector.observation.value = ALL
    inspector.only_disagreements.value = True
    for i in inspector.visible:
        assert inspector._disagrees(inspector.rows[i], None)
    inspector.only_disagreements.value = False

    inspector.position.value = min(1, inspector.position.max)
    plain = inspector.views[0].value
    words = [w for w in inspector.word.options if w != NO_WORD]
    if words:
        inspector.word.value = words[0]
        assert inspector.views[0].value != plain  # attention overlay drawn

    inspector.beams.value, inspector.max_tokens.value = 2, 10
    inspector.regenerate.click()
    assert inspector.current["regenerated"] and "regenerated" in inspector.header.value


def test_inspector_needs_matching_rows(trained_tiny):
    _, _, data, rows = trained_tiny
    with pytest.raises(ValueError, match="no prediction"):
        PredictionInspector([{**rows[0], "uid": "CXR-none"}], data)


def test_attention_example_prefers_a_finding_word():
    from medexgen_lib.visualize import attention_example
    rows = [{"prediction": ""}, {"prediction": "Heart normal."}, {"prediction": "Small left effusion."}]
    assert attention_example(rows) == (rows[2], "effusion")
    assert attention_example(rows[:2]) == (rows[1], "Heart")
    assert attention_example(rows[:1]) is None
