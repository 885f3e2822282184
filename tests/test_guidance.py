"""Clinical guidance (observation head, guidance tokens), laterality, seed aggregation, ablation rows."""

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medexgen_lib import guidance, report_edits
from medexgen_lib.config import load_config
from medexgen_lib.labeler import label_report
from medexgen_lib.model import ReportGenerator, ReportGeneratorConfig
from medexgen_lib.metrics import laterality, load_phantom_truth, macro_f1_from_counts, study_statistics
from medexgen_lib.postprocess import likely_sides, post_process
from medexgen_lib.sides import split_sentences
from medexgen_lib.seeds import bleu4_from_sums, paired_bootstrap

from conftest import SMALL_DATA_SPLIT

LABELS = ["Cardiomegaly", "Pleural Effusion", "Pleural Effusion, left", "Pleural Effusion, right"]


def _model(tokens: bool = True, labels=LABELS, embedding: bool = False, **more) -> ReportGenerator:
    config = ReportGeneratorConfig(vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                   encoder="resnet18", image_size=64, n_layer=1, n_head=2, n_embd=16,
                                   n_positions=32, guidance_labels=list(labels), guidance_tokens=tokens,
                                   guidance_embedding=embedding, **more)
    return ReportGenerator(config)


def _prompted(**more) -> ReportGenerator:
    """A model whose decoder input starts with the guidance prompt (words: token ids 10..13)."""
    torch.manual_seed(0)
    return _model(tokens=False, embedding=True, guidance_prompt=True, guidance_hard=True,
                  guidance_word_ids=[[10], [11, 12], [13], [12]], **more).eval()


def test_the_prompt_comes_before_the_report_and_generate_continues_teacher_forcing():
    model = _prompted()
    assert model.prompt_length == len(LABELS)
    images, ids = torch.randn(2, 2, 3, 64, 64), torch.tensor([[0, 5, 6, 7], [0, 8, 9, 1]])
    with torch.no_grad():
        logits = model(images, ids, labels=ids).logits
    assert logits.shape == (2, 4, 50)  # the report's positions only
    greedy = model.generate(images, max_new_tokens=5)
    with torch.no_grad():
        forced = model(images, torch.cat([torch.zeros(2, 1, dtype=torch.long), greedy], 1)).logits
    assert torch.equal(forced.argmax(-1)[:, :-1], greedy)
    # generate must build the prompt as forward does: its first step's logits are forward's
    # for whatever labels the head predicts, and those logits change with the labels
    bos, image = torch.zeros(1, 1, dtype=torch.long), images[:1]
    seen = []
    for labels in (torch.tensor([[1., 1, 1, 0]]), torch.tensor([[0., 1, 0, 0]])):
        model.predicted_labels = lambda logits, labels=labels: labels  # what the head "predicts"
        out = model.generate(image, max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            expected = model(image, bos, teacher_labels=labels).logits[0, -1]
        assert torch.allclose(out.scores[0][0], expected, atol=1e-5)
        seen.append(expected)
    assert not torch.allclose(seen[0], seen[1], atol=1e-4)
    del model.predicted_labels
    beams = model.generate(images, max_new_tokens=5, num_beams=3)
    assert beams.shape[0] == 2 and model._prompt is None and model._condition is None


def test_a_side_label_carries_its_findings_presence_in_the_prompt():
    model = _prompted()
    words = model._label_words()
    left = model.guidance.prompt_tokens(torch.tensor([[0., 1, 1, 0]]), words)[0]
    unsided = model.guidance.prompt_tokens(torch.tensor([[0., 1, 0, 0]]), words)[0]
    states = model.guidance.states
    # effusion with a side: its own token says "absent", the side's says "present" + its words
    assert torch.allclose(left[1], states[0, 1]) and torch.allclose(left[2], states[1, 2] + words[2])
    assert torch.allclose(unsided[1], states[1, 1] + words[1]) and torch.allclose(unsided[2], states[0, 2])


def test_label_words_name_the_side_and_the_finding():
    assert guidance.label_words("Pleural Effusion, left") == "left pleural effusion"
    assert guidance.label_words("Cardiomegaly") == "cardiomegaly"


def test_thresholds_chosen_on_val_smoothed_and_only_for_observations():
    labels = ["A", "B", "C", "B, left"]
    probabilities = torch.tensor([[0.9, 0.30, 0.2, 0.9], [0.8, 0.25, 0.1, 0.9],
                                  [0.1, 0.05, 0.3, 0.1], [0.2, 0.1, 0.4, 0.1]])
    targets = torch.tensor([[1., 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    # A: perfect from 0.2 to 0.75, 0.5 nearest; B: perfect for [0.1, 0.25), but 0.1's lower
    # neighbour (0.05) is not and 0.2's upper one (0.25) is not: 0.15 is the smoothed best;
    # C: no positive study; "B, left": a side label, decided given the finding.
    assert guidance.choose_thresholds(probabilities, targets, labels) == [0.5, 0.15, 0.5, 0.5]


def test_a_label_the_head_does_not_tell_apart_on_val_is_switched_off():
    labels = ["Seen", "Unseen", "Unseen, left"]
    # "Unseen": a quarter of the studies positive, probabilities unrelated to it (AUROC 0.5):
    # the best smoothed F1 calls every study positive; with min_auroc it is never predicted.
    probabilities = torch.tensor([[0.9, 0.2, 0.5], [0.8, 0.2, 0.5], [0.1, 0.2, 0.5], [0.2, 0.2, 0.5]] * 2)
    targets = torch.tensor([[1., 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]] * 2)
    assert guidance.auroc(probabilities[:, 1], targets[:, 1]) == 0.5
    assert guidance.auroc(probabilities[:, 0], targets[:, 0]) == 1.0
    assert guidance.choose_thresholds(probabilities, targets, labels)[1] < 0.2
    chosen = guidance.choose_thresholds(probabilities, targets, labels, min_auroc=0.75)
    assert chosen == [0.5, guidance.LABEL_OFF, 0.5]
    hard = guidance.hard_labels(probabilities, chosen, labels)
    assert hard[:, 1].sum() == 0 and hard[:, 0].tolist() == [1, 1, 0, 0] * 2


def test_hard_labels_give_a_present_finding_its_likelier_side():
    labels = ["A", "B", "C", "B, left"]
    probabilities = torch.tensor([[0.6, 0.3, 0.4, 0.25], [0.6, 0.3, 0.4, 0.1], [0.1, 0.1, 0.9, 0.9]])
    hard = guidance.hard_labels(probabilities, [0.5, 0.2, 0.5, 0.5], labels)
    # row 0: B at its threshold 0.2, left given B = 0.83; row 1: left given B = 0.33;
    # row 2: no B, so no side of it, however likely the side label alone
    assert hard.tolist() == [[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]]
    model = _prompted(guidance_thresholds=[0.5, 0.2, 0.5, 0.5])
    logits = torch.logit(torch.tensor([[0.6, 0.3, 0.25, 0.05]]))
    assert model.predicted_labels(logits).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_likely_sides_of_present_findings_follow_the_side_given_the_finding():
    labels = ["Pleural Effusion", "Pleural Effusion, left", "Pleural Effusion, right", "Cardiomegaly"]
    probabilities = torch.tensor([[0.9, 0.8, 0.1, 0.9],     # left
                                  [0.9, 0.7, 0.6, 0.1],     # both
                                  [0.9, 0.2, 0.3, 0.1],     # neither more likely than not: the likelier
                                  [0.02, 0.015, 0.012, 0.1],  # absent: no side, however the ratios fall
                                  [0.9, float("nan"), 0.2, 0.1]])  # not a number: no side
    present = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert likely_sides(probabilities, labels, present) == [
        {"Pleural Effusion": {"left"}}, {"Pleural Effusion": {"left", "right"}},
        {"Pleural Effusion": {"right"}}, {}, {}]
    columns = [0, 3]  # no side labels: no sides
    assert likely_sides(probabilities[:, columns], ["Pleural Effusion", "Cardiomegaly"],
                                 present[:, columns]) == [{}] * 5
    # one side label only: that side where it is likely given the finding, never by default
    one = likely_sides(probabilities[:, [0, 2]], ["Pleural Effusion", "Pleural Effusion, right"],
                                present[:, [0, 2]])
    assert one == [{}, {"Pleural Effusion": {"right"}}, {}, {}, {}]


LEFT = {"Pleural Effusion": {"left"}, "Pneumothorax": {"left"}, "Consolidation": {"left"},
        "Lung Lesion": {"left"}}


@pytest.mark.parametrize("text, sides, expected", [
    ("There is a small right pleural effusion. Left pneumothorax.", LEFT,
     "There is a small left pleural effusion. Left pneumothorax."),
    ("Right pleural effusion.", {"Pleural Effusion": {"left", "right"}}, "Bilateral pleural effusion."),
    ("Bilateral pleural effusions.", {"Pleural Effusion": {"right"}}, "Right pleural effusions."),
    ("LEFT PLEURAL EFFUSION.", {"Pleural Effusion": {"right"}}, "RIGHT PLEURAL EFFUSION."),
    # the phantom's phrasings: the side before, inside or after the finding's words
    ("Airspace opacity in the right lung base consistent with consolidation.", LEFT,
     "Airspace opacity in the left lung base consistent with consolidation."),
    ("Right lower lobe consolidation, may represent pneumonia.", LEFT,
     "Left lower lobe consolidation, may represent pneumonia."),
    ("Blunting of the right costophrenic angle consistent with pleural effusion.", LEFT,
     "Blunting of the left costophrenic angle consistent with pleural effusion."),
    ("There is a 8 mm nodule in the right lower lung", LEFT, "There is a 8 mm nodule in the left lower lung"),
    # the sentence's finding has no known side, or it names another sided finding too: kept
    ("Right pleural effusion.", {"Pneumothorax": {"left"}}, "Right pleural effusion."),
    ("Right pleural effusion and left pneumothorax.", LEFT, "Right pleural effusion and left pneumothorax."),
    ("Right pleural effusion and pneumothorax.", LEFT, "Right pleural effusion and pneumothorax."),
    # the side word belongs to something else: a negated finding, other anatomy, another clause
    ("Small pleural effusion, no pneumothorax on the right.", LEFT,
     "Small pleural effusion, no pneumothorax on the right."),
    ("Previously seen right pleural effusion has resolved, new pneumothorax.", LEFT,
     "Previously seen right pleural effusion has resolved, new pneumothorax."),
    ("No right pneumothorax! Pleural effusion.", LEFT, "No right pneumothorax! Pleural effusion."),
    ("Atelectasis at the right base with small pleural effusion.", LEFT,
     "Atelectasis at the right base with small pleural effusion."),
    ("Small pleural effusion and elevated right hemidiaphragm.", LEFT,
     "Small pleural effusion and elevated right hemidiaphragm."),
    ("Bilaterally, pleural effusions are seen, larger on the right.", LEFT,
     "Bilaterally, pleural effusions are seen, larger on the right."),
    ("Consolidation in the right lower lobe obscures the right heart border.", LEFT,
     "Consolidation in the right lower lobe obscures the right heart border."),
    ("No right pleural effusion.", LEFT, "No right pleural effusion."),
    # "bilateral" only in front of a finding, not after "the"
    ("Focal consolidation in the right lower lobe.", {"Consolidation": {"left", "right"}},
     "Focal consolidation in the right lower lobe."),
    # uncertain findings follow the head too; decimals do not split sentences; ends kept
    ("A 1.5 cm right nodule; possible right pneumothorax\nok", LEFT,
     "A 1.5 cm left nodule; possible left pneumothorax\nok"),
    ("leftover righteous effusion.", LEFT, "leftover righteous effusion."),
    ("", LEFT, "")])
def test_align_sides_sets_each_sided_findings_side_word_to_the_heads(text, sides, expected):
    assert report_edits.align_sides(text, sides) == expected


def _writing(monkeypatch, written: list[str], probabilities: list[list[float]], thresholds: list[float]
             ) -> ReportGenerator:
    """A prompted model whose decoder writes ``written`` and whose head gives ``probabilities``."""
    torch.manual_seed(0)
    model = _prompted(guidance_thresholds=thresholds)
    model.tokenizer = SimpleNamespace(batch_decode=lambda ids, **_: list(written))
    monkeypatch.setattr(model.guidance, "logits", lambda features, batch, mask: torch.logit(
        torch.tensor(probabilities)))
    return model


def _reports(model: ReportGenerator, images: torch.Tensor) -> list[str]:
    """The reports made of ``model``'s decoding: its texts post-processed as its config says."""
    texts, probabilities = model.decode_reports(images, max_new_tokens=2)
    return post_process(texts, probabilities, model.config).texts


def test_reports_align_sides_only_when_the_model_says_so(tmp_path, monkeypatch):
    written = ["Small right pleural effusion. Heart normal.", "Left pleural effusion."]
    # the head: effusion present in both studies, left given effusion in the first only
    model = _writing(monkeypatch, written, [[0.1, 0.9, 0.8, 0.1], [0.1, 0.9, 0.1, 0.8]], [0.5] * 4)
    images = torch.randn(2, 2, 3, 64, 64)
    assert _reports(model, images) == written
    model.config.guidance_align_sides = True
    assert _reports(model, images) == [
        "Small left pleural effusion. Heart normal.", "Right pleural effusion."]
    model.tokenizer = None
    model.save_pretrained(tmp_path / "m")
    assert ReportGenerator.from_pretrained(tmp_path / "m").config.guidance_align_sides is True


def test_the_sentence_bank_keeps_each_findings_most_typical_sentence_that_states_it_alone():
    texts = ["Heart size is normal. Left pleural effusion. No pneumothorax.",
             "The heart is enlarged. Left pleural effusion.",
             "Cardiomegaly. There is a small left pleural effusion.",
             # more often than "Cardiomegaly." but each mentions a second observation, or hedges
             "Cardiomegaly, no pleural effusion. Cardiomegaly, no pleural effusion.",
             "Possible cardiomegaly. Possible cardiomegaly. Possible cardiomegaly.",
             "Right pleural effusion and cardiomegaly. Small pneumothorax. Small pneumothorax.",
             "Bilateral pleural effusions. Pleural effusion. Pleural effusion"]  # no end: not a bank sentence
    assert report_edits.sentence_bank(texts, LABELS) == {
        "Cardiomegaly": "Cardiomegaly.",  # seen once, as "The heart is enlarged.": tie, the shorter
        "Pleural Effusion + Pleural Effusion, left": "Left pleural effusion.",
        "Pleural Effusion + Pleural Effusion, left + Pleural Effusion, right": "Bilateral pleural effusions.",
        "Pleural Effusion": "Pleural effusion."}  # Pneumothorax has no label: no sentence
    # labels without side labels: sides are not part of the key (a key the model accepts on load),
    # and the key's sentence names no side where one does not
    assert report_edits.sentence_bank(texts, ["Cardiomegaly", "Pleural Effusion"])["Pleural Effusion"] \
        == "Pleural effusion."
    assert report_edits.sentence_bank(texts[:2], ["Cardiomegaly", "Pleural Effusion"])["Pleural Effusion"] \
        == "Left pleural effusion."  # only sided sentences: one of them


def test_the_sentence_bank_prefers_the_wording_radiologists_repeat_to_a_short_one_off():
    texts = ["Right effusion.", "There is a small right pleural effusion.", "Small right pleural effusion.",
             "A small right pleural effusion is present.", "Right pleural effusion with nipple shadows."]
    bank = report_edits.sentence_bank(texts, LABELS)
    assert bank["Pleural Effusion + Pleural Effusion, right"] == "Small right pleural effusion."
    # an exact repeat still counts most
    assert report_edits.sentence_bank(texts + ["Right effusion."] * 3, LABELS)[
        "Pleural Effusion + Pleural Effusion, right"] == "Right effusion."


def test_the_sentence_bank_leaves_out_comparisons_measurements_and_deidentified_words():
    texts = ["Stable cardiomegaly. Stable cardiomegaly. Cardiomegaly unchanged from prior.",
             "There is a 2 cm left pleural effusion. There is a 2 cm left pleural effusion.",
             "XXXX cardiomegaly. XXXX cardiomegaly. The heart is enlarged. Small left pleural effusion.",
             # a dictation slip the labeler reads as a finding, and a comparison: twice each
             "Lungs are clear and cardiomegaly. Lungs are clear and cardiomegaly.",
             "No change in the left pleural effusion. No change in the left pleural effusion."]
    assert report_edits.sentence_bank(texts, LABELS) == {
        "Cardiomegaly": "The heart is enlarged.",
        "Pleural Effusion + Pleural Effusion, left": "Small left pleural effusion."}


def test_normal_sentences_are_those_only_reports_without_a_finding_contain():
    texts = ["Heart size is normal. The lungs are clear. Normal chest.",
             "Heart size is normal. The lungs are clear. Normal chest. No acute bony abnormality.",
             "The heart is enlarged. No acute bony abnormality. No acute bony abnormality.",
             "Heart size is normal. Lungs are clear bilaterally. No pneumothorax. No pneumothorax."]
    # "Heart size is normal." and "No pneumothorax." mention an observation; the bony one is
    # in a report with a finding; "Lungs are clear bilaterally." is in one report only
    assert report_edits.normal_sentences(texts) == ["The lungs are clear.", "Normal chest."]


BANK = {"Cardiomegaly": "Cardiomegaly.", "Pleural Effusion": "Pleural effusion.",
        "Pleural Effusion + Pleural Effusion, left": "Left pleural effusion."}
NORMAL = {"The lungs are clear.", "Normal chest."}


@pytest.mark.parametrize("text, present, sides, expected", [
    # added after the last sentence stating a finding; the statement that it is absent goes (the
    # rest of its sentence stays), and so do sentences only normal reports contain
    ("The heart is enlarged. The lungs are clear. No pleural effusion or pneumothorax. Bones intact. "
     "1. Cardiomegaly.", ["Cardiomegaly", "Pleural Effusion", "Pleural Effusion, left"],
     {"Pleural Effusion": {"left"}},
     "The heart is enlarged. No pneumothorax. Bones intact. 1. Cardiomegaly. Left pleural effusion."),
    # a sentence that also states a finding loses only the negating clause (was kept whole: a contradiction)
    ("The heart is enlarged, no pleural effusion.", ["Cardiomegaly", "Pleural Effusion"], {},
     "The heart is enlarged. Pleural effusion."),
    # a normal sentence without its final period is one too
    ("Heart size is normal. The lungs are clear", ["Pleural Effusion"], {}, "Pleural effusion. Heart size is normal."),
    # two findings added: a sentence negating either goes
    ("No pneumothorax. No pleural effusion. Heart size is normal.", ["Cardiomegaly", "Pleural Effusion"], {},
     "Cardiomegaly. Pleural effusion. No pneumothorax."),
    # nothing stated yet: first; no side label, or a side the bank lacks: the finding alone
    ("Heart size is normal. No pneumothorax.", ["Pleural Effusion"], {},
     "Pleural effusion. Heart size is normal. No pneumothorax."),
    ("No pneumothorax.", ["Pleural Effusion", "Pleural Effusion, right"], {"Pleural Effusion": {"right"}},
     "Pleural effusion. No pneumothorax."),
    # sentences without an end (cut off, or ended by a line break) get one
    ("Cardiomegaly\nNo pneumothorax", ["Cardiomegaly", "Pleural Effusion"], {},
     "Cardiomegaly. Pleural effusion. No pneumothorax."),
    # stated already (positive or uncertain, any side): the text as it was, spaces included
    ("Heart normal.  Right pleural effusion.\nThe lungs are clear.", ["Pleural Effusion", "Pleural Effusion, left"],
     {"Pleural Effusion": {"left"}}, "Heart normal.  Right pleural effusion.\nThe lungs are clear."),
    ("Possible  cardiomegaly.", ["Cardiomegaly"], {}, "Possible  cardiomegaly."),
    # side labels, "No Finding" and findings without a sentence add nothing
    ("The lungs are clear.", ["No Finding", "Pleural Effusion, left", "Edema"], {}, "The lungs are clear."),
])
def test_state_findings_adds_a_sentence_for_each_predicted_finding_the_text_omits(text, present, sides, expected):
    assert report_edits.state_findings(text, present, sides, {"No Finding": "Normal chest.", **BANK}, NORMAL) == expected


@pytest.mark.parametrize("text, expected", [
    ("Small left pleural effusion without pneumothorax.",
     "Small left pleural effusion. There is a right apical pneumothorax."),
    ("No pleural effusion or pneumothorax.", "There is a right apical pneumothorax. No pleural effusion."),
    ("Heart size normal and no effusion or pneumothorax", "There is a right apical pneumothorax. "
                                                         "Heart size normal and no effusion."),
    ("The lungs are clear without focal consolidation, effusion, or pneumothorax.",
     "There is a right apical pneumothorax. The lungs are clear without focal consolidation or effusion."),
    ("No pneumothorax, small left effusion.", "Small left effusion. There is a right apical pneumothorax."),
    ("Pneumothorax is not seen, the heart is enlarged.", "The heart is enlarged. There is a right apical pneumothorax."),
])
def test_state_findings_leaves_no_statement_that_the_added_finding_is_absent(text, expected):
    bank = {**BANK, "Pneumothorax + Pneumothorax, right": "There is a right apical pneumothorax."}
    out = report_edits.state_findings(text, ["Pneumothorax"], {"Pneumothorax": {"right"}}, bank, NORMAL)
    assert out == expected
    # the labeler reads the added finding positive, and no sentence of the report says it is absent
    assert label_report(out)["Pneumothorax"] == "positive"
    assert all(label_report(s)["Pneumothorax"] != "negative" for s in split_sentences(out))
    # what the rest of the text said is still said
    for observation in ("Pleural Effusion", "Cardiomegaly", "Consolidation"):
        assert label_report(out)[observation] == label_report(text)[observation]


def test_reports_state_the_heads_findings_only_with_a_bank(tmp_path, monkeypatch):
    written = ["Heart normal. No pleural effusion.", "Left pleural effusion. The lungs are clear."]
    # the head: effusion in both studies, left given effusion in the first, right in the second;
    # cardiomegaly .7 in the first, under its threshold
    model = _writing(monkeypatch, written, [[0.7, 0.9, 0.8, 0.1], [0.1, 0.9, 0.1, 0.8]], [0.8, 0.5, 0.5, 0.5])
    images = torch.randn(2, 2, 3, 64, 64)
    assert _reports(model, images) == written
    model.config.guidance_sentences = BANK
    model.config.guidance_normal_sentences = sorted(NORMAL)
    assert _reports(model, images) == ["Left pleural effusion. Heart normal.",
                                                             written[1]]  # stated: kept as written
    model.config.guidance_align_sides = True  # sides first, then the bank
    assert _reports(model, images)[1] == "Right pleural effusion. The lungs are clear."
    model.tokenizer = None
    model.save_pretrained(tmp_path / "m")
    loaded = ReportGenerator.from_pretrained(tmp_path / "m").config
    assert (loaded.guidance_sentences, loaded.guidance_normal_sentences) == (BANK, sorted(NORMAL))


def test_degenerate_decoder_output_is_counted_though_the_bank_repairs_it(monkeypatch):
    from medexgen_lib.metrics import score

    written = ["effusion effusion effusion effusion", "Heart normal. Left pleural effusion."]
    # the head: cardiomegaly and a left effusion in the first study, a left effusion in the second
    model = _writing(monkeypatch, written, [[0.9, 0.9, 0.8, 0.1], [0.1, 0.9, 0.8, 0.1]], [0.5] * 4)
    model.config.guidance_sentences = BANK
    drafts, probabilities = model.decode_reports(torch.randn(2, 2, 3, 64, 64), max_new_tokens=2)
    reports = post_process(drafts, probabilities, model.config).texts
    assert drafts == written and reports == ["effusion effusion effusion effusion. Cardiomegaly.", written[1]]
    refs = ["The heart is enlarged.", "Heart normal. Left pleural effusion."]
    assert score(refs, reports)["degenerate_predictions"] == 0  # the bank's sentence hides it ...
    result = score(refs, reports, decoder_texts=drafts)  # ... from a count of the reports alone
    assert result["degenerate_predictions"] == 1 and result["reports_changed_by_post_processing"] == 1
    assert result["clinical per_observation"]["Cardiomegaly"]["predicted"] == 0  # no clinical credit
    assert score(refs, reports)["clinical per_observation"]["Cardiomegaly"]["predicted"] == 1


@pytest.mark.parametrize("setting", ["guidance.align_sides", "guidance.state_findings"])
def test_settings_that_rewrite_reports_change_the_evaluation_fingerprint(setting):
    from medexgen_lib.validation import evaluation_fingerprint

    on, off = (evaluation_fingerprint(load_config("demo", {setting: value}), ["CXR1"])[0] for value in (True, False))
    assert on != off  # epochs validated with and without it do not compete for best on resume


@pytest.mark.parametrize("setting", ["guidance.align_sides", "guidance.state_findings"])
def test_settings_that_read_the_head_need_it(setting):
    from medexgen_lib.config import ConfigError

    with pytest.raises(ConfigError, match=f"{setting} needs guidance.head"):
        load_config("demo", {"guidance.head": False, "guidance.embedding": False, "guidance.prompt": False,
                             "guidance.align_sides": False, "guidance.state_findings": False, setting: True})


@pytest.mark.reliability
@pytest.mark.parametrize("field, value", [
    ("guidance_align_sides", "yes"), ("guidance_align_sides", 1),
    ("guidance_thresholds", [0.5]), ("guidance_thresholds", [0.5, 0.5, 1.5, 0.5]),
    ("guidance_thresholds", [0.5, 0.5, float("nan"), 0.5]),
    ("guidance_word_ids", [[10], [11], [13], [999]]), ("guidance_word_ids", [[10], [11], [13], [-5]]),
    ("guidance_word_ids", [[10], [], [13], [12]]), ("guidance_word_ids", [[10]]),
    ("guidance_word_ids", [10, 11, 13, 12]), ("guidance_word_ids", [["a"], [11], [13], [12]]),
    ("guidance_labels", ["Cardiomegaly", "Pleural Effusion, left", "Pleural Effusion, right", "X"]),
    ("guidance_labels", 5), ("guidance_sentences", ["Cardiomegaly."]),
    ("guidance_sentences", {"Cardiomegaly": ""}), ("guidance_sentences", {"Cardiomegaly": 5}),
    ("guidance_sentences", {"Pleural Effusion, left": "Left pleural effusion."}),
    ("guidance_sentences", {"Pleural Effusion + Pleural Effusion, right + Pleural Effusion, left": "x."}),
    ("guidance_sentences", {"Pneumothorax": "Pneumothorax."}),
    ("guidance_sentences", {"Cardiomegaly": "No cardiomegaly."}),
    ("guidance_sentences", {"Pleural Effusion + Pleural Effusion, left": "Right pleural effusion."}),
    ("guidance_sentences", {"Cardiomegaly": "Left pleural effusion. Cardiomegaly."}),
    ("guidance_sentences", {"Cardiomegaly": "Cardiomegaly"}),
    ("guidance_normal_sentences", ["The lungs are clear.", ""]), ("guidance_normal_sentences", "Normal.")])
def test_guidance_fields_that_do_not_fit_are_refused_on_load(field, value, tmp_path):
    model = _prompted(guidance_thresholds=[0.5] * 4)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=field):
        ReportGenerator.from_pretrained(tmp_path / "m")


@pytest.mark.reliability
def test_a_config_with_too_many_guidance_labels_is_refused_before_they_are_walked(tmp_path):
    model = _prompted(guidance_thresholds=[0.5] * 4)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    labels = [f"Finding {i}" for i in range(2000)] + [f"Finding {i}, left" for i in range(2000)]
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "guidance_labels": labels}))
    with pytest.raises(ValueError, match=r"config\.json: model config field 'guidance_labels' holds 4000 "
                                         r"labels, at most 1000"):
        ReportGenerator.from_pretrained(tmp_path / "m")


@pytest.mark.reliability
def test_a_config_with_too_many_word_ids_for_a_label_is_refused(tmp_path):
    model = _prompted(guidance_thresholds=[0.5] * 4)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    words = [[10], [11] * 100_000, [13], [12]]
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "guidance_word_ids": words}))
    with pytest.raises(ValueError, match=r"config\.json: model config field 'guidance_word_ids' holds 100000 "
                                         r"token ids for label 1, at most 64") as refused:
        ReportGenerator.from_pretrained(tmp_path / "m")
    assert len(str(refused.value)) < 400


@pytest.mark.reliability
def test_bank_keys_of_many_labels_are_found_in_linear_time():
    labels = [f"Finding {i}" for i in range(20000)] + [f"Finding {i}, left" for i in range(20000)]
    started = time.perf_counter()
    keys = report_edits.bank_keys(labels)
    assert len(keys) == 40000 and "Finding 7 + Finding 7, left" in keys
    assert time.perf_counter() - started < 5  # quadratic (a list lookup per label): minutes


def test_a_model_saved_before_the_prompt_and_thresholds_loads_and_keeps_its_rule(tmp_path):
    model = _model(tokens=False, embedding=True, guidance_hard=True).eval()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("guidance_prompt", "guidance_thresholds", "guidance_word_ids"):
        del config[key]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = ReportGenerator.from_pretrained(tmp_path / "m")
    images = torch.randn(2, 2, 3, 64, 64)
    assert torch.equal(loaded.generate(images, max_new_tokens=4), model.generate(images, max_new_tokens=4))
    # its rule: every label at 0.5, a side without its finding included
    logits = torch.logit(torch.tensor([[0.6, 0.4, 0.6, 0.1]]))
    assert loaded.predicted_labels(logits).tolist() == [[1.0, 0.0, 1.0, 0.0]]



def test_report_targets_read_observations_and_sides_from_the_text():
    text = ("The heart is enlarged. There is a small left pleural effusion. No pneumothorax. "
            "IMPRESSION: 1. Cardiomegaly. 2. Left pleural effusion.")
    assert guidance.report_targets(text, LABELS) == [1.0, 1.0, 1.0, 0.0]
    both = guidance.report_targets("There are bilateral pleural effusions.", LABELS)
    assert both == [0.0, 1.0, 1.0, 1.0]
    assert guidance.report_targets("No pleural effusion on the left.", LABELS) == [0.0, 0.0, 0.0, 0.0]


def test_choose_labels_keeps_frequent_observations_and_their_sides():
    texts = ["Small right pneumothorax.", "Right pneumothorax is present.", "The heart is enlarged."]
    assert guidance.choose_labels(texts, min_count=2) == ["Pneumothorax", "Pneumothorax, left",
                                                           "Pneumothorax, right"]


def test_guidance_tokens_shapes_and_labels_round_trip():
    model = _model().eval()
    images = torch.randn(3, 2, 3, 64, 64)
    visual, _ = model.encode(images)
    states, mask, logits = model.encoder_states(images)
    assert logits.shape == (3, len(LABELS))
    assert states.shape == (3, visual.shape[1] + len(LABELS), 16) and mask.shape == states.shape[:2]
    # labels -> guidance tokens -> labels: each token is exactly its label's "present" or
    # "absent" embedding, so the nearest of the two gives the labels back.
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    states, _, _ = model.encoder_states(images, teacher_labels=labels)
    tokens = states[:, visual.shape[1]:]
    present, absent = model.guidance.states[1], model.guidance.states[0]
    decoded = ((tokens - present).norm(dim=-1) < (tokens - absent).norm(dim=-1)).float()
    assert torch.equal(decoded, labels)
    assert model.generate(images, max_new_tokens=4).shape[0] == 3


def test_guidance_embedding_conditions_every_step_and_is_cleared():
    torch.manual_seed(0)
    model = _model(tokens=False, embedding=True).eval()
    images, ids = torch.randn(2, 2, 3, 64, 64), torch.tensor([[0, 5, 6], [0, 7, 8]])
    yes, no = torch.ones(2, len(LABELS)), torch.zeros(2, len(LABELS))
    with torch.no_grad():
        model.guidance.states.mul_(50)  # make the two label states far apart
        a = model(images, ids, teacher_labels=yes).logits
        b = model(images, ids, teacher_labels=no).logits
    assert not torch.allclose(a, b) and model._condition is None
    greedy = model.generate(images, max_new_tokens=3)
    beams = model.generate(images, max_new_tokens=3, num_beams=2)
    assert greedy.shape[0] == beams.shape[0] == 2 and model._condition is None


def test_observation_loss_is_set_by_the_hooks_inputs_and_reaches_the_head():
    model = _model(tokens=False).train()
    cfg = load_config("demo", {"guidance.head": True, "guidance.loss_weight": 2.0})
    examples = [SimpleNamespace(uid="a", text="Left pleural effusion."),
                SimpleNamespace(uid="b", text="The heart is enlarged.")]
    hook = guidance.LossHook(cfg, SimpleNamespace(examples=examples), LABELS)
    assert hook.weight == 2.0
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 1, 2]])
    inputs = hook.inputs({"uids": ["a", "b"]}, "cpu")
    assert torch.equal(inputs["teacher_labels"], inputs["observation_targets"])
    out = model(torch.randn(2, 2, 3, 64, 64), ids, torch.ones_like(ids), **inputs)
    assert out.observation_loss is not None and out.observation_loss > 0
    out.observation_loss.backward()
    assert model.guidance.head.weight.grad.abs().sum() > 0
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_label_smoothing_changes_the_lm_loss():
    from medexgen_lib.optimization import token_loss

    model = _model(labels=[]).train()
    ids = torch.tensor([[0, 5, 6, 1]])
    out = model(torch.randn(1, 2, 3, 64, 64), ids, torch.ones_like(ids), labels=ids)
    plain, scored = token_loss(out.logits, ids)
    smooth, _ = token_loss(out.logits, ids, label_smoothing=0.1)
    assert torch.isclose(plain / scored, out.loss) and not torch.isclose(smooth, plain)


def test_guided_model_saves_and_loads(tmp_path):
    model = _model().eval()
    model.save_pretrained(tmp_path / "m")
    loaded = ReportGenerator.from_pretrained(tmp_path / "m")
    assert loaded.config.guidance_labels == LABELS
    images = torch.randn(1, 2, 3, 64, 64)
    assert torch.equal(model.encoder_states(images)[0], loaded.encoder_states(images)[0])


def test_old_lr_grouping_puts_cross_attention_with_the_decoder():
    from medexgen_lib.optimization import parameter_groups

    model = _model(labels=[])
    groups = {cfg: {n: g["name"] for g in parameter_groups(model, load_config(
        "demo", {"train.cross_attention_lr": cfg}).train) for n in g["param_names"]}
        for cfg in ("new", "decoder")}
    cross = [n for n in groups["new"] if "crossattention" in n]
    assert cross and all(groups["new"][n].startswith("new") for n in cross)
    assert all(groups["decoder"][n].startswith("decoder") for n in cross)


# --------------------------------------------------------------------------- laterality

TRUTH = {"CXR1": {"Pleural Effusion": {"left"}},
         "CXR2": {"Pneumothorax": {"right"}, "Lung Lesion": {"left"}},
         "CXR3": {"Pleural Effusion": {"left", "right"}},
         "CXR4": {}}


def test_laterality_counts_detected_findings_with_the_right_side():
    predictions = ["Small left pleural effusion.",  # right side
                   "A small left pneumothorax is present. No nodule.",  # wrong side; lesion missed
                   "There are bilateral pleural effusions.",  # both sides: right
                   "Right pleural effusion."]  # nothing sided in the truth: not counted
    result = laterality(TRUTH, ["CXR1", "CXR2", "CXR3", "CXR4"], predictions)
    assert result == {"laterality": 2 / 3, "laterality_correct": 2, "laterality_detected": 3,
                      "laterality_findings": 4}


def test_laterality_of_a_report_without_side_or_detection():
    result = laterality(TRUTH, ["CXR1", "CXR3"], ["Pleural effusion.", "Normal chest."])
    assert result["laterality"] == 0.0 and result["laterality_detected"] == 1
    assert laterality(TRUTH, ["CXR4"], ["Normal."])["laterality"] is None


def test_phantom_truth_follows_the_written_reports(phantom_dir):
    from medexgen_lib.reports import parse_report

    truth = load_phantom_truth(phantom_dir / "reports")
    studies = json.loads((phantom_dir / "reports" / "phantom_findings.json").read_text())
    uids, texts = [], []
    for study in studies:
        report = parse_report(phantom_dir / "reports" / "ecgen-radiology" / f"{study['number']}.xml")
        uids.append(f"CXR{study['number']}")
        texts.append(f"{report['findings']} {report['impression']}")
    result = laterality(truth, uids, texts)
    assert result["laterality_findings"] > 5 and result["laterality"] == 1.0
    swapped = [t.replace("left", "LEFT").replace("right", "left").replace("LEFT", "right") for t in texts]
    assert laterality(truth, uids, swapped)["laterality"] < 0.5


# --------------------------------------------------------------------------- aggregation

REFS = ["The heart is normal in size. No pleural effusion.", "Small left pleural effusion.",
        "The heart is enlarged.", "Right pneumothorax is present.", "Lungs are clear."]
PREDS = ["The heart is normal. No effusion.", "Small left pleural effusion.", "Heart size is normal.",
         "Right pneumothorax.", "Lungs are clear bilaterally."]


@pytest.mark.parametrize("convention", ["full", "r2gen"])
def test_sums_reproduce_corpus_bleu4_and_macro_f1(convention):
    from medexgen_lib.metrics import score

    options = {"reference_convention": convention, "training_reports": REFS * 3}
    stats = study_statistics(REFS, PREDS, **options)
    expected = score(REFS, PREDS, **options)
    ones = np.ones((1, len(REFS)))
    assert bleu4_from_sums(ones @ stats["bleu"])[0] == pytest.approx(expected["BLEU-4"], abs=1e-9)
    sums = np.einsum("bn,nkj->bkj", ones, stats["clinical"])
    assert macro_f1_from_counts(sums)[0] == expected["clinical macro_F1"]


# The model invents a lung lesion no reference has (in half of 40 studies) and writes the effusions
# it should; the baseline writes "Normal." (one word: degenerate, so no clinical credit) or, in
# the second fixture, the normal report. Macro-F1 over observations in references OR predictions
# charges the invented lesion; the references-only average (the bootstrap's before) did not.
INVENTED_REFS = ["Heart size normal. The lungs are clear."] * 20 + ["Small left pleural effusion."] * 20
INVENTED_MODEL = (["Heart size normal. There is a right upper lobe nodule."] * 10
                  + ["Heart size normal. The lungs are clear."] * 10
                  + ["Small left pleural effusion. There is a right upper lobe nodule."] * 10
                  + ["Small left pleural effusion."] * 10)


@pytest.mark.parametrize("baseline", ["Normal.", "Heart size normal. The lungs are clear."])
def test_the_bootstrap_resamples_the_tabled_macro_f1(baseline):
    from medexgen_lib.metrics import score

    guesses = [baseline] * len(INVENTED_REFS)
    table = score(INVENTED_REFS, INVENTED_MODEL)["clinical macro_F1"] - score(INVENTED_REFS, guesses)["clinical macro_F1"]
    result = paired_bootstrap([study_statistics(INVENTED_REFS, INVENTED_MODEL)],
                              [study_statistics(INVENTED_REFS, guesses)], "clinical macro_F1", n_resamples=300)
    assert result["difference"] == pytest.approx(table, abs=1e-12)
    assert result["ci95"][0] <= result["difference"] <= result["ci95"][1]


def test_a_degenerate_prediction_gets_no_clinical_credit_in_the_bootstrap_either():
    from medexgen_lib.metrics import score

    refs, preds = ["The lungs are clear."] * 4, ["Normal."] * 4
    assert score(refs, preds)["clinical macro_F1"] == 0.0
    sums = study_statistics(refs, preds)["clinical"].sum(0)
    assert macro_f1_from_counts(sums) == 0.0  # was 1.0: "Normal." labelled No Finding positive


def test_paired_bootstrap_known_answers():
    same = [study_statistics(REFS, PREDS)] * 2
    tie = paired_bootstrap(same, same, "clinical macro_F1", n_resamples=200)
    assert tie["difference"] == 0 and tie["ci95"] == [0.0, 0.0] and not tie["excludes_zero"]
    refs = REFS * 8
    perfect = [study_statistics(refs, refs)]
    constant = [study_statistics(refs, ["Lungs are clear."] * len(refs))]
    win = paired_bootstrap(perfect, constant, "BLEU-4", n_resamples=300)
    assert win["excludes_zero"] and 0 < win["ci95"][0] <= win["difference"] <= win["ci95"][1]
    flip = paired_bootstrap(constant, perfect, "BLEU-4", n_resamples=300)
    assert flip["difference"] == pytest.approx(-win["difference"])


def _seed_logs(folder, seed: int, predictions: list[str], references: list[str], baselines: dict[str, str],
               drafts: list[str] | None = None, **options) -> None:
    """A seed's metrics and predictions files as ``run_evaluation`` writes them (scores from ``score``;
    ``drafts``: the decoder's texts, the predictions themselves by default)."""
    from medexgen_lib.metrics import score

    logs = folder / "logs"
    logs.mkdir(parents=True)
    drafts = drafts or predictions
    scored = {name: score(references, [guess] * len(references), **options) for name, guess in baselines.items()}
    (logs / "metrics_test.json").write_text(json.dumps(
        {"seed": seed, "model": score(references, predictions, **options, decoder_texts=drafts),
         "baselines": scored}))
    rows = [{"uid": f"u{i}", "reference": r, "prediction": p, "decoder_text": d, "baseline_predictions": baselines}
            for i, (r, p, d) in enumerate(zip(references, predictions, drafts))]
    (logs / "predictions_test.json").write_text(json.dumps(rows))


BASELINES = {"retrieval (nearest image)": "Small left pleural effusion.", "constant (most frequent)": "Normal.",
             "constant (best of top 50 on val)": "Heart size normal. The lungs are clear."}


def test_aggregate_seeds_mean_std_and_bootstrap(tmp_path):
    from medexgen_lib.seeds import aggregate_seeds

    dirs = [tmp_path / "s0", tmp_path / "s1"]
    _seed_logs(dirs[0], 0, INVENTED_MODEL, INVENTED_REFS, BASELINES)
    # the perfect seed but for 5 studies whose decoder wrote "effusion effusion" (the bank stated the rest)
    _seed_logs(dirs[1], 1, INVENTED_REFS, INVENTED_REFS, BASELINES, ["effusion effusion"] * 5 + INVENTED_REFS[5:])
    result = aggregate_seeds(dirs, out_path=tmp_path / "agg.json", n_resamples=200)
    tabled = [json.loads((d / "logs" / "metrics_test.json").read_text()) for d in dirs]
    model = result["metrics"]["model"]["clinical macro_F1"]
    values = [t["model"]["clinical macro_F1"] for t in tabled]
    assert values[1] < 1.0 and model["mean"] == pytest.approx(np.mean(values))
    assert model["std"] == pytest.approx(np.std(values, ddof=1))
    for name in BASELINES:  # the interval's point is the table's difference, and it lies inside
        for metric in ("clinical macro_F1", "BLEU-4"):
            interval = result["bootstrap"][f"model - {name}"][metric]
            table = np.mean([t["model"][metric] - t["baselines"][name][metric] for t in tabled])
            assert interval["difference"] == pytest.approx(table, abs=1e-9)
            assert interval["ci95"][0] <= interval["difference"] <= interval["ci95"][1]
    assert result["bootstrap"]["model - constant (most frequent)"]["BLEU-4"]["excludes_zero"]
    assert json.loads((tmp_path / "agg.json").read_text())["n_seeds"] == 2


def test_the_seeds_command_reprints_a_finished_runs_tables_drawn_findings_included(tmp_path, capsys):
    from medexgen_lib.seeds import main

    root = tmp_path / "out"
    for seed, folder in ((0, root), (1, root / "seeds" / "seed_1"), (2, root / "seeds" / "seed_2")):
        _seed_logs(folder, seed, INVENTED_MODEL, INVENTED_REFS, BASELINES)
        metrics = json.loads((folder / "logs" / "metrics_test.json").read_text())
        metrics["model"]["drawn_recall"] = 0.5 + 0.1 * seed  # as stage 05 records on the real-text phantom
        (folder / "logs" / "metrics_test.json").write_text(json.dumps(metrics))
    (root / "seeds" / "seed_old").mkdir()  # not a seed's folder: left out
    assert main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert "0.600 ± 0.100" in printed and "model - retrieval (nearest image)" in printed
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "not found" in capsys.readouterr().err


def test_aggregate_seeds_scores_under_the_runs_reference_convention(tmp_path):
    from medexgen_lib.seeds import aggregate_seeds

    training = INVENTED_REFS[::4] * 3
    _seed_logs(tmp_path / "s0", 0, INVENTED_MODEL, INVENTED_REFS, BASELINES, reference_convention="r2gen",
               training_reports=training)
    with pytest.raises(ValueError, match="r2gen"):
        aggregate_seeds([tmp_path / "s0"], n_resamples=50)
    result = aggregate_seeds([tmp_path / "s0"], n_resamples=50, training_reports=training)
    tabled = json.loads((tmp_path / "s0" / "logs" / "metrics_test.json").read_text())
    name = "constant (best of top 50 on val)"
    assert result["bootstrap"][f"model - {name}"]["BLEU-4"]["difference"] == pytest.approx(
        tabled["model"]["BLEU-4"] - tabled["baselines"][name]["BLEU-4"], abs=1e-9)


@pytest.mark.reliability
def test_aggregate_seeds_refuses_a_predictions_file_its_metrics_file_does_not_score(tmp_path):
    from medexgen_lib.seeds import aggregate_seeds

    _seed_logs(tmp_path / "s0", 0, INVENTED_MODEL, INVENTED_REFS, BASELINES)
    path = tmp_path / "s0" / "logs" / "predictions_test.json"
    rows = json.loads(path.read_text())
    rows[0]["prediction"] = "Large right pneumothorax."
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="metrics_test.json gives model clinical macro_F1"):
        aggregate_seeds([tmp_path / "s0"], n_resamples=50)


def test_a_seeds_file_is_shown_only_for_the_model_and_config_it_was_made_from(tmp_path):
    from medexgen_lib.seeds import SEEDS_FILE, aggregate_seeds, config_sha256, metrics_sha256, seeds_for_run

    cfg = load_config("demo", {"paths.output_dir": str(tmp_path / "out")})
    _seed_logs(tmp_path / "s0", 0, INVENTED_MODEL, INVENTED_REFS, BASELINES)
    metrics = tmp_path / "s0" / "logs" / "metrics_test.json"
    saved = {**json.loads(metrics.read_text()), "split": "test", "model_sha256": "a" * 64}
    metrics.write_text(json.dumps(saved))
    this_run = {"split": "test", "model_sha256": "a" * 64, "model": saved["model"]}
    assert seeds_for_run(cfg, this_run)[0] is None and "does not exist" in seeds_for_run(cfg, this_run)[1]
    aggregate_seeds([tmp_path / "s0"], out_path=cfg.paths.logs / SEEDS_FILE, n_resamples=20,
                    config_hash=config_sha256(cfg))
    shown, why = seeds_for_run(cfg, this_run)
    assert shown is not None and shown["made_from"] == {"model_sha256": "a" * 64, "config_sha256": config_sha256(cfg),
                                                        "metrics_sha256": metrics_sha256(saved["model"])}
    # a later run with other settings, another model (the next invocation's first notebook pass), another split
    other = load_config("demo", {"paths.output_dir": str(tmp_path / "out"), "eval.num_beams": 3})
    assert seeds_for_run(other, this_run)[0] is None and "another config" in seeds_for_run(other, this_run)[1]
    assert seeds_for_run(cfg, {**this_run, "model_sha256": "b" * 64})[0] is None
    assert seeds_for_run(cfg, {**this_run, "split": "val"})[0] is None
    # the same model scored again otherwise (another labeler or metrics version, another data folder)
    rescored = {**this_run, "model": {**saved["model"], "clinical macro_F1": 0.1}}
    assert seeds_for_run(cfg, rescored)[0] is None and "another metrics" in seeds_for_run(cfg, rescored)[1]
    # the folders are not part of the config's hash
    assert config_sha256(load_config("demo", {"paths.output_dir": str(tmp_path / "elsewhere")})) == config_sha256(cfg)
    # a seeds file from before the hashes were stored is not shown either
    (cfg.paths.logs / SEEDS_FILE).write_text(json.dumps({**shown, "made_from": None}))
    assert seeds_for_run(cfg, this_run)[0] is None


@pytest.mark.slow
def test_seeds_cli_writes_the_aggregate_file(tmp_path):
    settings = {"data.n_phantom_studies": 40, "data.phantom_image_size": 48, "images.size": 64,
                **SMALL_DATA_SPLIT, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "train.epochs": 1,
                "train.batch_size": 8, "eval.max_new_tokens": 10, "tokenizer.vocab_size": 400,
                "text.max_length": 64, "paths.data_dir": str(tmp_path / "d"),
                "paths.output_dir": str(tmp_path / "o")}
    args = [a for k, v in settings.items() for a in ("-p", k, str(v))]
    done = subprocess.run([sys.executable, "-m", "medexgen_lib", "run", "--profile", "demo", "--to", "05",
                           "--seeds", "2", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    aggregate = json.loads((tmp_path / "o" / "logs" / "metrics_test_seeds.json").read_text())
    assert aggregate["n_seeds"] == 2 and aggregate["seeds"] == [0, 1]
    assert (tmp_path / "o" / "seeds" / "seed_1" / "logs" / "metrics_test.json").exists()
    assert "model - retrieval (nearest image)" in aggregate["bootstrap"]
    # made from this model and config: notebook 05 of the same settings shows it
    from medexgen_lib.seeds import config_sha256, metrics_sha256, seeds_for_run

    cfg = load_config("demo", {k: str(v) for k, v in settings.items()})
    metrics = json.loads((tmp_path / "o" / "logs" / "metrics_test.json").read_text())
    assert aggregate["made_from"] == {"model_sha256": metrics["model_sha256"], "config_sha256": config_sha256(cfg),
                                      "metrics_sha256": metrics_sha256(metrics["model"])}
    assert seeds_for_run(cfg, metrics)[0] == aggregate


def test_the_full_profiles_prompt_reads_a_pretrained_gpt2s_own_word_embeddings(tiny_gpt2_dir, tmp_path):
    from medexgen_lib.tokenizer import load_gpt2_tokenizer

    cfg = load_config("full", {"model.decoder_source": str(tiny_gpt2_dir), "model.encoder": "resnet18",
                               "model.encoder_pretrained": False})
    tokenizer = load_gpt2_tokenizer(str(tiny_gpt2_dir))
    model = ReportGenerator.build(cfg.model, tokenizer, 64, 48, LABELS, cfg.guidance).eval()
    assert model.config.guidance_prompt and not model.config.guidance_embedding
    assert model.config.guidance_word_ids[2] == tokenizer(" left pleural effusion",
                                                          add_special_tokens=False)["input_ids"]
    table = model.decoder.get_input_embeddings().weight
    assert torch.equal(model._label_words()[1], table[model.config.guidance_word_ids[1]].mean(0))
    images = torch.randn(2, 2, 3, 64, 64)
    out = model.generate(images, max_new_tokens=6, num_beams=2)
    assert out.shape[0] == 2 and out.shape[1] <= 6
    model.save_pretrained(tmp_path / "m")
    loaded = ReportGenerator.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.generate(images, max_new_tokens=6), model.generate(images, max_new_tokens=6))


def test_ablation_rows_load_differ_from_the_row_before_and_end_at_the_demo_default():
    from medexgen_lib.ablation import ROWS

    configs = [load_config("demo", overrides).to_dict() for overrides in ROWS.values()]
    assert configs[-1] == load_config("demo").to_dict()
    assert all(before != after for before, after in zip(configs, configs[1:]))


def test_reports_name_sides_given_the_finding_for_a_model_without_thresholds(monkeypatch):
    model = _prompted(guidance_align_sides=True)  # saved before thresholds: each label at 0.5
    model.tokenizer = SimpleNamespace(batch_decode=lambda ids, **_: ["Right pleural effusion."])
    # effusion present; neither side above 0.5 alone, both above 0.5 given the finding
    monkeypatch.setattr(model.guidance, "logits", lambda features, batch, mask: torch.logit(
        torch.tensor([[0.1, 0.55, 0.30, 0.29]])))
    assert _reports(model, torch.randn(1, 2, 3, 64, 64)) == ["Bilateral pleural effusion."]


def test_ablation_prepares_its_data_again_where_an_earlier_run_left_other_settings(tmp_path):
    from medexgen_lib.ablation import run_ablation
    from conftest import TINY
    from medexgen_lib.acquisition import acquire, build_studies_table
    from medexgen_lib.preprocess import run_preprocessing
    from medexgen_lib.splits import load_splits

    settings = {**TINY, "paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out"),
                "train.epochs": 1, "train.log_with": "none"}
    earlier = load_config("demo", {**settings, "data.n_phantom_studies": 20})
    build_studies_table(earlier, acquire(earlier))
    run_preprocessing(earlier)
    row = "+ side words from the head"
    result = run_ablation("demo", settings, n_seeds=1, rows=[row])
    splits = load_splits(tmp_path / "data" / "processed" / "splits.json")
    assert sum(len(uids) for uids in splits.values()) == TINY["data.n_phantom_studies"] != 20
    scored = json.loads((tmp_path / "out" / "ablation" / "side_words_from_the_head"
                         / "seed_0" / "logs" / "metrics_test.json").read_text())
    assert scored["n"] == len(splits["test"]) and row in result["rows"]
    from medexgen_lib.ablation import ROW_FILE, _slug

    saved = json.loads((tmp_path / "out" / "ablation" / _slug(row) / ROW_FILE).read_text())
    assert saved["scored_with"] == [{"seed": 0, "labeler_version": scored["model"]["labeler_version"],
                                     "metrics_version": scored["model"]["metrics_version"]}]
    # a row trained with other data or training settings is not tabled beside these
    from medexgen_lib.ablation import write_table

    for other in ({"data.phantom_seed": 7}, {"train.epochs": 2}, {"guidance.head": False}):  # the last: no config
        assert row not in write_table(load_config("demo", settings), "demo", {**settings, **other}, 1)["rows"]
    assert row in write_table(load_config("demo", settings), "demo", settings, 1)["rows"]


def test_a_setting_an_old_ablation_run_did_not_save_counts_as_its_default(tmp_path):
    from medexgen_lib.ablation import _trained_as

    cfg = load_config("demo", {"train.export": "best", "guidance.state_findings": False})
    saved = cfg.to_dict()
    del saved["train"]["export"], saved["guidance"]["state_findings"]  # run before they existed
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "config_04_training.json").write_text(json.dumps(saved))
    assert _trained_as(tmp_path, cfg) == []  # the defaults: best on val, no sentence bank
    assert _trained_as(tmp_path, load_config("demo")) == ["train.export", "guidance.state_findings"]
    assert _trained_as(tmp_path / "nothing", cfg) == ["config"]


@pytest.mark.parametrize("scored_with, tabled", [
    ({"labeler_version": None, "metrics_version": None}, True),  # this version (filled in below)
    ({"labeler_version": "2.1", "metrics_version": None}, False),  # an older labeler
    ({"labeler_version": None, "metrics_version": "2"}, False),  # older metrics
    (None, False)])  # a row saved before the versions were recorded
def test_ablation_tables_only_rows_scored_by_this_labeler_and_metrics_version(tmp_path, caplog, scored_with,
                                                                              tabled):
    import logging

    from medexgen_lib.ablation import COLUMNS, ROW_FILE, ROWS, _slug, format_table, write_table
    from medexgen_lib.labeler import LABELER_VERSION
    from medexgen_lib.metrics import METRICS_VERSION

    settings = {"paths.output_dir": str(tmp_path / "out")}
    name = "+ side words from the head"
    folder = tmp_path / "out" / "ablation" / _slug(name)
    (folder / "seed_0" / "logs").mkdir(parents=True)
    load_config("demo", {**settings, **ROWS[name], "seed": 0}).save(folder / "seed_0" / "logs" /
                                                                   "config_04_training.json")
    row = {"overrides": ROWS[name], "seeds": [0], **{c: {"mean": 0.5, "std": 0.0, "n": 1} for c in COLUMNS},
           "retrieval": {c: {"mean": 0.4, "std": 0.0, "n": 1} for c in COLUMNS[:-1]}}
    if scored_with is not None:
        current = {"labeler_version": LABELER_VERSION, "metrics_version": METRICS_VERSION}
        row["scored_with"] = [{"seed": 0, **{k: v or current[k] for k, v in scored_with.items()}}]
    (folder / ROW_FILE).write_text(json.dumps(row))
    with caplog.at_level(logging.WARNING):
        result = write_table(load_config("demo", settings), "demo", settings, 1)
    assert (name in result["rows"]) is tabled and (name in format_table(result)) is tabled
    assert any("labeler or metrics version" in r.getMessage() for r in caplog.records) is not tabled


@pytest.mark.reliability
def test_an_ablation_row_run_again_keeps_its_old_result_until_the_new_one_is_complete(tmp_path, monkeypatch):
    """The old row.json was deleted before the row ran: an error or Ctrl-C lost it. It is kept until
    the new row replaces it, and is tabled only while its seed folders are the ones it was made from."""
    import medexgen_lib.acquisition as acquisition_module
    import medexgen_lib.evaluate as evaluate_module
    import medexgen_lib.preprocess as preprocess_module
    import medexgen_lib.train as train_module
    from medexgen_lib.ablation import COLUMNS, ROW_FILE, _slug, run_ablation, write_table
    from medexgen_lib.labeler import LABELER_VERSION
    from medexgen_lib.metrics import METRICS_VERSION
    from medexgen_lib.seeds import RETRIEVAL

    runs = []

    def trained(cfg, progress=False):  # stage 04's files, each training run's own history
        runs.append(cfg.seed)
        cfg.paths.logs.mkdir(parents=True, exist_ok=True)
        cfg.save(cfg.paths.logs / "config_04_training.json")
        (cfg.paths.logs / "history.jsonl").write_text(json.dumps({"run": len(runs)}) + "\n")

    def evaluated(cfg, progress=False):
        model = {**{c: 0.1 * len(runs) for c in COLUMNS}, "labeler_version": LABELER_VERSION,
                 "metrics_version": METRICS_VERSION}
        (cfg.paths.logs / "metrics_test.json").write_text(json.dumps(model))
        return {"model": model, "baselines": {RETRIEVAL: dict(model)}}

    monkeypatch.setattr(acquisition_module, "acquire", lambda cfg: None)
    monkeypatch.setattr(acquisition_module, "build_studies_table", lambda cfg, result: None)
    monkeypatch.setattr(preprocess_module, "run_preprocessing", lambda cfg: None)
    monkeypatch.setattr(train_module, "train", trained)
    monkeypatch.setattr(evaluate_module, "run_evaluation", evaluated)
    row = "+ side words from the head"
    settings = {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out")}
    assert row in run_ablation("demo", settings, n_seeds=1, rows=[row])["rows"]
    row_file = tmp_path / "out" / "ablation" / _slug(row) / ROW_FILE
    finished = row_file.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run_ablation("demo", settings, n_seeds=1, rows=[row])
    assert row_file.read_bytes() == finished  # kept, and still tabled: its seed folder is untouched
    assert row in write_table(load_config("demo", settings), "demo", settings, 1)["rows"]

    monkeypatch.setattr(train_module, "train", trained)
    monkeypatch.setattr(evaluate_module, "run_evaluation", killed)
    with pytest.raises(KeyboardInterrupt):  # trained again, not yet scored
        run_ablation("demo", settings, n_seeds=1, rows=[row])
    assert row_file.read_bytes() == finished  # kept, but not tabled beside the new training
    assert row not in write_table(load_config("demo", settings), "demo", settings, 1)["rows"]


@pytest.mark.parametrize("sentence, expected", [
    ("No pneumothorax or effusion, but there is cardiomegaly.", "No effusion, but there is cardiomegaly."),
    ("No pneumothorax or effusion and there is cardiomegaly.", "No effusion and there is cardiomegaly."),
    ("Small left pleural effusion without pneumothorax, however there is cardiomegaly.",
     "Small left pleural effusion, however there is cardiomegaly."),
    ("No pneumothorax, but there is cardiomegaly.", "There is cardiomegaly.")])
def test_removing_a_negated_clause_keeps_the_clauses_after_it_apart(sentence, expected):
    """The clause's separator from the next clause was lost: "... No effusionbut there is
    cardiomegaly." labelled cardiomegaly negative."""
    assert report_edits.without_negations(sentence, {"Pneumothorax"}) == expected
    assert label_report(expected)["Cardiomegaly"] == "positive"


def test_the_sentence_bank_labels_each_distinct_sentence_once_so_large_corpora_stay_quick(monkeypatch):
    texts = ["Heart size is normal. Small left pleural effusion. No pneumothorax.",
             "Small left pleural effusion. The heart is enlarged.", "Right pleural effusion."] * 200
    expected = report_edits.sentence_bank(texts, LABELS)
    labelled = []
    key = report_edits.bank_sentence_key
    monkeypatch.setattr(report_edits, "bank_sentence_key", lambda s, labels: labelled.append(s) or key(s, labels))
    assert report_edits.sentence_bank(texts, LABELS) == expected
    distinct = {s for text in texts for s in split_sentences(text)}
    assert len(labelled) <= len(distinct)


def test_the_banks_word_agreement_is_the_lcs_f1_of_the_words():
    def lcs(a, b):  # the textbook dynamic programme
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b = ([str(w) for w in rng.integers(0, 4, rng.integers(0, 12))] for _ in range(2))
        expected = 2 * lcs(a, b) / (len(a) + len(b)) if lcs(a, b) else 0.0
        assert report_edits._lcs_f1(a, b) == pytest.approx(expected)
