"""Post-processing, the named step between the decoder's text and the report: what each step
edits, in which order, and that it says which reports it changed."""

import pytest
import torch

from medexgen_lib.model import ReportGenerator, ReportGeneratorConfig
from medexgen_lib.postprocess import STEPS, post_process

LABELS = ["Cardiomegaly", "Pleural Effusion", "Pleural Effusion, left", "Pleural Effusion, right"]
BANK = {"Cardiomegaly": "The heart is enlarged.",
        "Pleural Effusion + Pleural Effusion, left": "Left pleural effusion."}
# the head: effusion in both studies, left given effusion in the first, right in the second;
# cardiomegaly in the first only
PROBABILITIES = torch.tensor([[0.9, 0.9, 0.8, 0.1], [0.1, 0.9, 0.1, 0.8]])


def _config(**guidance) -> ReportGeneratorConfig:
    return ReportGeneratorConfig(vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                 encoder="resnet18", image_size=64, n_layer=1, n_head=2, n_embd=16,
                                 n_positions=32, guidance_labels=list(LABELS),
                                 guidance_thresholds=[0.5] * len(LABELS), **guidance)


def test_nothing_is_edited_where_the_config_asks_for_no_step_or_there_is_no_head():
    texts = ["Small right pleural effusion.", "Heart normal."]
    for config, probabilities in ((_config(), PROBABILITIES),
                                  (_config(guidance_align_sides=True, guidance_sentences=BANK), None)):
        out = post_process(texts, probabilities, config)
        assert (out.texts, out.changed_by) == (texts, [[], []])


def test_each_step_names_the_reports_it_changed():
    texts = ["Small right pleural effusion.", "Right pleural effusion. Heart normal."]
    aligned = post_process(texts, PROBABILITIES, _config(guidance_align_sides=True))
    # the first study's side becomes the head's (left); the second already names the head's side
    assert aligned.texts == ["Small left pleural effusion.", texts[1]]
    assert aligned.changed_by == [["align_sides"], []]
    both = post_process(texts, PROBABILITIES, _config(guidance_align_sides=True, guidance_sentences=BANK))
    # sides first, then the bank states the head's cardiomegaly where the text leaves it out
    assert both.texts == ["Small left pleural effusion. The heart is enlarged.", texts[1]]
    assert both.changed_by == [["align_sides", "state_findings"], []]
    assert set(STEPS) >= {step for steps in both.changed_by for step in steps}


def test_a_planned_report_is_named_as_planned():
    normal = "The heart is normal in size. No pleural effusion."
    config = _config(guidance_sentences=BANK, guidance_normal_report=normal)
    out = post_process(["Heart normal.", "Heart normal."], torch.tensor([[0.1, 0.1, 0.1, 0.1]] * 2), config)
    assert out.texts == [normal, normal]  # no finding predicted: the normal report
    assert out.changed_by == [["plan_report"], ["plan_report"]]


@pytest.mark.parametrize("setting", [{"guidance_align_sides": True}, {"guidance_sentences": BANK}])
def test_the_model_itself_returns_the_decoders_text_unedited(setting, monkeypatch):
    """Whatever post-processing its config asks for, ReportGenerator only decodes."""
    torch.manual_seed(0)
    model = ReportGenerator(_config(**setting)).eval()
    monkeypatch.setattr(model, "decode", lambda ids: ["Small right pleural effusion. "] * len(ids))
    monkeypatch.setattr(model.guidance, "logits", lambda features, batch, mask: torch.logit(PROBABILITIES))
    texts, probabilities = model.decode_reports(torch.randn(2, 2, 3, 64, 64), max_new_tokens=2)
    assert texts == ["Small right pleural effusion."] * 2  # stripped, nothing else
    assert torch.allclose(probabilities, PROBABILITIES)
