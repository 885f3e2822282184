"""Sentence planning (medexgen_lib.planning): the normal report, the head's findings in it."""

from medexgen_lib.labeler import label_report
from medexgen_lib.planning import contradicted, normal_report, plan_report

NORMAL = ("The heart is normal in size and contour. There is no mediastinal widening. "
          "The lungs are clear bilaterally. No large pleural effusion or pneumothorax. The XXXX are intact.")
BANK = {"Cardiomegaly": "Mild cardiomegaly.",
        "Pleural Effusion + Pleural Effusion, right": "There is a small right pleural effusion.",
        "Pleural Effusion": "Small pleural effusion.",
        "Lung Lesion + Lung Lesion, left": "Left upper lobe nodule."}


def test_no_finding_predicted_gives_the_normal_report_whatever_the_decoder_wrote():
    assert plan_report("There is a right lower lobe nodule.", [], {}, BANK, NORMAL) == NORMAL
    assert plan_report("Heart normal.", ["No Finding"], {}, BANK, NORMAL) == NORMAL


def test_each_finding_replaces_the_normal_sentence_about_its_anatomy():
    planned = plan_report("The heart is normal.", ["Cardiomegaly", "Pleural Effusion"],
                          {"Pleural Effusion": {"right"}}, BANK, NORMAL)
    # the negated pleura sentence keeps what it says of the pneumothorax the head does not predict
    assert planned == ("Mild cardiomegaly. There is no mediastinal widening. The lungs are clear "
                       "bilaterally. There is a small right pleural effusion. No pneumothorax. The XXXX are intact.")
    labels = label_report(planned)
    assert labels["Cardiomegaly"] == "positive" and labels["Pleural Effusion"] == "positive"


def test_the_banks_sentence_states_a_finding_and_the_decoders_only_where_the_bank_lacks_its_sides():
    decoded = ("Heart size normal. Moderate right pleural effusion is present. "
               "There is a left upper lobe nodule.")
    planned = plan_report(decoded, ["Pleural Effusion"], {"Pleural Effusion": {"right"}}, BANK, NORMAL)
    assert "There is a small right pleural effusion." in planned and "Moderate" not in planned
    unsided = {key: text for key, text in BANK.items() if key != "Pleural Effusion + Pleural Effusion, right"}
    planned = plan_report(decoded, ["Pleural Effusion"], {"Pleural Effusion": {"right"}}, unsided, NORMAL)
    assert "Moderate right pleural effusion is present." in planned
    assert "nodule" not in planned  # the head does not predict it: the decoder's claim goes
    assert "Small pleural effusion." not in planned  # stated once, in the decoder's words
    assert planned.startswith("The heart is normal in size and contour.")


def test_a_finding_the_bank_lacks_on_its_side_falls_back_to_the_unsided_sentence():
    planned = plan_report("", ["Pleural Effusion"], {"Pleural Effusion": {"left"}}, BANK, NORMAL)
    assert "Small pleural effusion." in planned and "No large pleural effusion" not in planned


def test_contradicted_by_negation_or_anatomy_but_not_a_sentence_stating_a_finding():
    assert contradicted("No large pleural effusion or pneumothorax.", ["Pleural Effusion"]) == {"Pleural Effusion"}
    assert contradicted("The lungs are clear bilaterally.", ["Consolidation", "Cardiomegaly"]) == {"Consolidation"}
    assert contradicted("The XXXX are intact.", ["Consolidation", "Cardiomegaly"]) == set()
    assert contradicted("Stable cardiomegaly.", ["Cardiomegaly"]) == set()


def test_normal_report_is_the_frequent_training_report_val_scores_best_on():
    common = "Heart size normal. Lungs are clear."
    wordy = "The heart is normal in size. The lungs are clear bilaterally. No pneumothorax."
    train = [common] * 5 + [wordy] * 3 + ["Cardiomegaly."]
    assert normal_report(train, [wordy, wordy]) == wordy
    assert normal_report(train, [common]) == common
    assert normal_report(train, []) == common


def test_reports_plan_around_the_normal_report_and_it_survives_save_and_load(tmp_path, monkeypatch):
    import torch

    from medexgen_lib.model import ReportGenerator
    from test_guidance import _reports, _writing

    written = ["Heart normal. Right pleural effusion. Nodule.", "Cardiomegaly."]
    # the head: effusion (left given effusion) in the first study; nothing in the second
    model = _writing(monkeypatch, written, [[0.1, 0.9, 0.8, 0.1], [0.1, 0.1, 0.1, 0.1]], [0.5, 0.5, 0.5, 0.5])
    model.config.guidance_align_sides = True
    model.config.guidance_sentences = {"Pleural Effusion": "Pleural effusion."}
    model.config.guidance_normal_report = NORMAL
    planned = _reports(model, torch.randn(2, 2, 3, 64, 64))
    # the bank has no left-sided sentence: the decoder's, its side set to the head's
    assert planned == [NORMAL.replace("No large pleural effusion or pneumothorax.",
                                      "Left pleural effusion. No pneumothorax."), NORMAL]
    model.tokenizer = None
    model.save_pretrained(tmp_path / "m")
    assert ReportGenerator.from_pretrained(tmp_path / "m").config.guidance_normal_report == NORMAL


def test_a_lung_finding_keeps_the_lungs_otherwise_clear():
    planned = plan_report("", ["Lung Opacity"], {}, {"Lung Opacity": "Left basilar opacity."}, NORMAL)
    assert planned == ("The heart is normal in size and contour. There is no mediastinal widening. "
                       "Left basilar opacity. The lungs are otherwise clear bilaterally. "
                       "No large pleural effusion or pneumothorax. The XXXX are intact.")


def test_plan_reports_needs_the_head_excludes_the_sentence_bank_and_changes_the_fingerprint():
    import pytest

    from medexgen_lib.config import ConfigError, load_config
    from medexgen_lib.validation import evaluation_fingerprint

    with pytest.raises(ConfigError, match="choose one"):
        load_config("demo", {"guidance.plan_reports": True})
    with pytest.raises(ConfigError, match="guidance.plan_reports needs guidance.head"):
        load_config("full", {"guidance.head": False, "guidance.prompt": False, "guidance.align_sides": False})
    on, off = (evaluation_fingerprint(load_config("full", {"guidance.plan_reports": value}), ["CXR1"])[0]
               for value in (True, False))
    assert on != off
    demo = load_config("demo")
    assert evaluation_fingerprint(demo, ["CXR1"])[1].keys().isdisjoint({"plan_reports", "min_auroc"})


def test_a_finding_the_bank_has_only_on_the_other_side_is_stated_on_the_heads_side():
    bank = {"Lung Lesion + Lung Lesion, right": "Right upper lobe nodule."}
    planned = plan_report("", ["Lung Lesion", "Cardiomegaly"], {"Lung Lesion": {"left"}},
                          {**BANK, **bank}, NORMAL)
    assert "Left upper lobe nodule." in planned and "Mild cardiomegaly." in planned
    assert label_report(planned)["Lung Lesion"] == "positive"
    # with nothing for the finding at all, the lungs are not called "otherwise" clear
    without = {key: text for key, text in BANK.items() if not key.startswith("Lung Lesion")}
    lost = plan_report("", ["Lung Lesion", "Cardiomegaly"], {"Lung Lesion": {"left"}}, without, NORMAL)
    assert "otherwise" not in lost


def test_a_decoder_sentence_that_negates_a_predicted_finding_is_not_used():
    planned = plan_report("Patchy bibasilar atelectasis, no pleural effusion.", ["Atelectasis", "Pleural Effusion"],
                          {"Pleural Effusion": {"right"}}, {**BANK, "Atelectasis": "Bibasilar atelectasis."}, NORMAL)
    assert "no pleural effusion" not in planned and "There is a small right pleural effusion." in planned
    assert label_report(planned)["Pleural Effusion"] == "positive"


def test_pleura_and_bones_sentences_make_way_for_their_findings():
    normal = "Heart size normal. The lungs and pleura are normal. The skeletal structures are normal."
    planned = plan_report("", ["Pleural Effusion", "Fracture"], {"Pleural Effusion": {"right"}},
                          {**BANK, "Fracture": "Rib fracture."}, normal)
    assert planned == "Heart size normal. There is a small right pleural effusion. Rib fracture."


def test_a_normal_sentence_negating_only_absent_findings_stays_beside_a_finding_of_its_anatomy():
    normal = "The heart is normal in size. The lungs are clear. No pleural effusion. No pneumothorax."
    planned = plan_report("", ["Pleural Effusion"], {"Pleural Effusion": {"right"}}, BANK, normal)
    assert "No pneumothorax." in planned and "No pleural effusion." not in planned
    assert label_report(planned)["Pleural Effusion"] == "positive"
    planned = plan_report("", ["Pneumothorax"], {}, {"Pneumothorax": "Small pneumothorax."}, normal)
    assert "No pleural effusion." in planned and "No pneumothorax." not in planned
    # what is left of a sentence once its negations go still speaks for its anatomy
    assert contradicted("Costophrenic angles are sharp without effusion.", ["Pneumothorax"]) == {"Pneumothorax"}
    assert contradicted("No pneumothorax.", ["Pleural Effusion"]) == set()


def test_a_finding_without_a_sided_bank_sentence_is_not_stated_on_the_side_its_anatomy_implies():
    from medexgen_lib.report_edits import sentence_bank
    labels = ["Consolidation", "Consolidation, left", "Consolidation, right"]
    texts = ["Retrocardiac consolidation."] * 3 + ["Lingular consolidation.", "Middle lobe consolidation.",
                                                  "Consolidation is present."]
    bank = sentence_bank(texts, labels)
    assert bank["Consolidation"] == "Consolidation is present."  # names no side, not even by its site
    for side in ("left", "right"):
        planned = plan_report("", ["Consolidation"], {"Consolidation": {side}}, bank, NORMAL)
        assert "Consolidation is present." in planned
        assert not any(site in planned.lower() for site in ("retrocardiac", "lingula", "middle lobe"))
