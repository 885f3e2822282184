"""The labeler's CheXpert conventions on hand-written sentences, and its agreement with MeSH on the real sample."""

import pytest

from medexgen_lib.labeler import (ABSENT, CHEXPERT_14, LABELER_VERSION, NEGATIVE, OBSERVATIONS, POSITIVE,
                                  UNCERTAIN, clauses, label_report)
from medexgen_lib.labeler_agreement import (MESH_TERMS, is_held_out, labeling_seconds_per_100, mesh_agreement,
                                            sample_agreement)

P, U, N, A = POSITIVE, UNCERTAIN, NEGATIVE, ABSENT

# The table of the issue that asked for these conventions (#13).
ISSUE_TABLE = [
    ("No pneumothorax, small right pleural effusion.", "Pleural Effusion", P),
    ("Heart is not enlarged, there is a large right pneumothorax.", "Pneumothorax", P),
    ("Lungs are clear without effusion, cardiomegaly is present.", "Cardiomegaly", P),
    ("Possible small left effusion, no pneumothorax.", "Pneumothorax", N),
    ("Heart size is borderline enlarged.", "Cardiomegaly", U),
    ("The mediastinum is widened.", "Enlarged Cardiomediastinum", P),
]
NEGATION = [
    ("No pleural effusion.", "Pleural Effusion", N),
    ("There is no evidence of pneumothorax.", "Pneumothorax", N),
    ("The lungs are clear without focal consolidation.", "Consolidation", N),
    ("The lungs are free of focal airspace disease.", "Lung Opacity", N),
    ("Negative for pneumothorax.", "Pneumothorax", N),
    ("The heart is not enlarged.", "Cardiomegaly", N),
    ("Interval resolution of the right lower lobe pneumonia.", "Pneumonia", N),
    ("Resolved right lower lobe pneumonia.", "Pneumonia", N),
    ("Pneumonia is unlikely.", "Pneumonia", N),
    ("Findings unlikely to represent edema.", "Edema", N),
    ("A pneumothorax is not seen.", "Pneumothorax", N),
    ("Pleural effusion is not identified.", "Pleural Effusion", N),
    ("The previously seen left effusion has resolved.", "Pleural Effusion", N),
    ("The right lower lobe opacity has cleared.", "Lung Opacity", N),
    ("Costophrenic angles are clear of effusion.", "Pleural Effusion", N),
    ("The left chest tube has been removed.", "Support Devices", N),
    ("No definite pneumonia.", "Pneumonia", N),
    ("No focal consolidation to suggest pneumonia.", "Pneumonia", N),
    ("Heart size is normal.", "Cardiomegaly", N),  # CheXpert: "normal" negates a heart mention
    ("Normal heart size and mediastinal contours.", "Enlarged Cardiomediastinum", N),
    ("Heart size is at the upper limits of normal.", "Cardiomegaly", N),  # CheXpert's "upper limit of normal"
    ("No change in the left pleural effusion.", "Pleural Effusion", P),  # pseudo-negation
    ("No significant interval change in the small right effusion.", "Pleural Effusion", P),
]
UNCERTAINTY = [
    ("Opacity at the left base may represent atelectasis.", "Atelectasis", U),
    ("Opacity at the left base may represent atelectasis.", "Lung Opacity", P),
    ("Possible small right effusion.", "Pleural Effusion", U),
    ("Right basilar opacity, likely atelectasis.", "Atelectasis", U),
    ("Right basilar opacity, likely atelectasis.", "Lung Opacity", P),
    ("Findings suggest early pulmonary edema.", "Edema", U),
    ("Findings suggestive of pneumonia.", "Pneumonia", U),
    ("Pneumonia cannot be excluded.", "Pneumonia", U),
    ("A small pneumothorax can not be ruled out.", "Pneumothorax", U),
    ("Atelectasis versus pneumonia.", "Atelectasis", U),
    ("Atelectasis versus pneumonia.", "Pneumonia", U),
    ("Left basilar scarring or atelectasis.", "Atelectasis", U),
    ("Atelectasis or pneumonia in the right base.", "Pneumonia", U),
    ("Borderline cardiomegaly.", "Cardiomegaly", U),
    ("Heart size is borderline.", "Cardiomegaly", U),
    ("Question of a small left pleural effusion.", "Pleural Effusion", U),
    ("Mild pulmonary vascular congestion.", "Edema", U),
    ("Pulmonary congestion.", "Edema", U),
    ("No vascular congestion.", "Edema", N),
    ("Blunting of the left costophrenic angle.", "Pleural Effusion", U),
    ("A small effusion may be present.", "Pleural Effusion", U),
    ("No new consolidation.", "Consolidation", U),  # CheXpert's pre-negation uncertainty: the old may remain
    ("Congestive heart failure.", "Cardiomegaly", U),  # CheXpert: CHF makes cardiomegaly uncertain
    ("Congestive heart failure.", "Edema", P),
]
KEEPS_POSITIVE = [
    ("Stable cardiomegaly.", "Cardiomegaly", P),
    ("Stable 1 cm nodule in the right lung.", "Lung Lesion", P),
    ("Left lower lobe opacity consistent with pneumonia.", "Pneumonia", P),
    ("Bibasilar opacities compatible with atelectasis.", "Atelectasis", P),
    ("Unchanged small left pleural effusion.", "Pleural Effusion", P),
    ("Hyperinflation consistent with emphysema.", "Emphysema", P),
]
SCOPE = [
    ("No pneumothorax, but there is a small effusion.", "Pleural Effusion", P),
    ("No pneumothorax, but there is a small effusion.", "Pneumothorax", N),
    ("No effusion, however there is mild cardiomegaly.", "Cardiomegaly", P),
    ("No focal consolidation, although atelectasis is present at the left base.", "Atelectasis", P),
    ("Lungs are clear, otherwise small right effusion.", "Pleural Effusion", P),
    ("No pneumothorax, small right pleural effusion.", "Pneumothorax", N),
    ("Heart is not enlarged, there is a large right pneumothorax.", "Cardiomegaly", N),
    ("Lungs are clear without effusion, cardiomegaly is present.", "Pleural Effusion", N),
    ("Possible small left effusion, no pneumothorax.", "Pleural Effusion", U),
    ("There is no effusion and the heart is enlarged.", "Cardiomegaly", P),
    ("No acute disease, stable cardiomegaly.", "Cardiomegaly", P),
    ("No pneumothorax. Possible pneumonia.", "Pneumothorax", N),
    ("No pneumothorax; there is a small effusion.", "Pleural Effusion", P),
    ("No infiltrate, atelectasis at the left base.", "Atelectasis", P),
    ("No effusion, right pneumothorax.", "Pneumothorax", P),
    ("There is no effusion and small right pneumothorax.", "Pneumothorax", P),
    ("Without effusion and with mild cardiomegaly.", "Cardiomegaly", P),
    ("Right lower lobe opacity, pneumonia cannot be excluded.", "Lung Opacity", P),
    ("No pneumothorax, pneumonia cannot be excluded.", "Pneumothorax", N),
    ("Lungs are clear except for mild bibasilar atelectasis.", "Atelectasis", P),
    ("Heart size is normal, no effusion, possible small right pneumothorax.", "Pneumothorax", U),
    ("The heart is normal in size, the mediastinum is widened.", "Enlarged Cardiomediastinum", P),
]
LISTS = [
    ("No effusion, pneumothorax or consolidation.", "Pleural Effusion", N),
    ("No effusion, pneumothorax or consolidation.", "Pneumothorax", N),
    ("No effusion, pneumothorax or consolidation.", "Consolidation", N),
    ("No pleural effusion, pneumothorax, or focal airspace disease is seen.", "Lung Opacity", N),
    ("There is no focal consolidation, pleural effusion or pneumothorax.", "Pneumothorax", N),
    ("Pleural effusion and pneumothorax are not seen.", "Pleural Effusion", N),
    ("Without edema, effusion or pneumothorax.", "Edema", N),
    ("No effusion or pneumothorax.", "Pneumothorax", N),  # negation before the "or" uncertainty
    ("Effusion, pneumothorax, and consolidation are not seen.", "Pleural Effusion", N),
    ("No pleural effusion, pneumothorax or consolidation is seen.", "Pleural Effusion", N),
    ("No effusion, pneumothorax or consolidation in the lungs.", "Consolidation", N),
    ("Neither effusion nor pneumothorax.", "Pneumothorax", N),
    ("No effusion, suspicious nodule or mass.", "Lung Lesion", N),
    # a qualified item in a list closed by "or" without the Oxford comma (labeler 2.2; was uncertain)
    ("No focal consolidation, large effusion or pneumothorax.", "Pleural Effusion", N),
    ("No focal consolidation, large effusion or pneumothorax.", "Pneumothorax", N),
    ("No focal consolidation, large effusion or pneumothorax.", "Consolidation", N),
    ("There is no acute pulmonary consolidation, large pleural effusion or pneumothorax.", "Pneumothorax", N),
    ("No focal consolidation, large pneumothorax or large pleural effusion.", "Pleural Effusion", N),
    # an unqualified statement after the negation stays one of its own ("or" between findings: uncertain)
    ("No pneumothorax, mild atelectasis or scarring at the left base.", "Atelectasis", U),
]
MENTIONS = [
    ("The mediastinum is widened.", "Enlarged Cardiomediastinum", P),
    ("Widened mediastinum.", "Enlarged Cardiomediastinum", P),
    ("The cardiomediastinal silhouette is enlarged.", "Enlarged Cardiomediastinum", P),
    ("There is widening of the superior mediastinum.", "Enlarged Cardiomediastinum", P),
    ("The heart is enlarged.", "Cardiomegaly", P),
    ("Heart size is mildly enlarged.", "Cardiomegaly", P),
    ("Enlarged cardiac silhouette.", "Cardiomegaly", P),
    ("Cardiac enlargement.", "Cardiomegaly", P),
    ("Calcified granuloma projects over the heart.", "Cardiomegaly", A),
    ("There is a small left pleural effusion.", "Pleural Effusion", P),
    ("Small pericardial effusion.", "Pleural Effusion", A),  # unmention
    ("Calcified nodule in the right upper lobe.", "Lung Lesion", A),  # a granuloma, not a lesion
    ("Calcified nodule in the right upper lobe.", "Granuloma", P),
    ("Lytic lesion of the left humerus.", "Lung Lesion", A),
    ("Massive hiatal hernia.", "Lung Lesion", A),
    ("Left upper lobe mass.", "Lung Lesion", P),
    ("Sequela of prior granulomatous infection.", "Pneumonia", A),
    ("Right lower lobe infection.", "Pneumonia", P),
    ("Left basilar air-space disease.", "Lung Opacity", P),
    ("Old healed left rib fractures.", "Fracture", P),
    ("Mild pleural thickening at the apices.", "Pleural Other", P),
    ("Left chest wall pacemaker in place.", "Support Devices", P),
    ("Sternotomy wires are intact.", "Support Devices", P),
    ("Small hiatal hernia.", "Hernia", P),
]
# Found by review (issue #13): real-style shapes the first version missed.
REVIEW = [
    ("Atelectasis, scarring, or pneumonia.", "Atelectasis", U),  # "or" closing a list of findings
    ("Atelectasis, scarring, or pneumonia.", "Pneumonia", U),
    ("Left basilar opacity, atelectasis, or infiltrate.", "Lung Opacity", U),
    ("Right IJ line with tip in the SVC.", "Support Devices", P),  # CheXpert: line, tube, plate, screw
    ("Lines and tubes are unchanged.", "Support Devices", P),
    ("Dobhoff tube in the stomach.", "Support Devices", P),
    ("Plate and screws in the lower cervical spine.", "Support Devices", P),
    ("Kerley B lines.", "Support Devices", A),
    ("Plate-like atelectasis at the left base.", "Support Devices", A),
    ("Increased interstitial markings.", "Lung Opacity", P),  # CheXpert's lung opacity phrases
    ("Coarse reticular markings bilaterally.", "Lung Opacity", P),
    ("No increased interstitial markings.", "Lung Opacity", N),
    ("Lungs are clear, no effusion, heart enlarged.", "Cardiomegaly", P),  # a predicate makes a statement
    ("No pneumothorax, heart size enlarged.", "Cardiomegaly", P),
    ("Resolution of the effusion with persistent atelectasis.", "Atelectasis", P),
    ("Resolution of the effusion with persistent atelectasis.", "Pleural Effusion", N),
    ("No pneumothorax.Small right effusion.", "Pleural Effusion", P),  # no space after the period
    ("1.No effusion.2.Left lower lobe pneumonia.", "Pneumonia", P),
    ("1) No pneumothorax 2) Small right pleural effusion", "Pleural Effusion", P),
    ("No pneumothorax - small right effusion.", "Pleural Effusion", P),  # a spaced dash separates
    ("Pleural effusion: none.", "Pleural Effusion", N),
    ("Pneumothorax: negative.", "Pneumothorax", N),
    ("Lungs: clear. Heart: enlarged.", "Cardiomegaly", P),  # a colon inside a statement is not a break
    ("Heart: normal size. Lungs: no effusion.", "Cardiomegaly", N),
    ("FINDINGS: No pneumothorax IMPRESSION: Cardiomegaly.", "Cardiomegaly", P),  # a header still breaks
    ("FINDINGS: No pneumothorax IMPRESSION: Cardiomegaly.", "Pneumothorax", N),
    ("Right lower lobe pneumonia with interval resolution.", "Pneumonia", N),  # CheXpert post-negation
    ("The heart, mediastinum, and hila are normal.", "Cardiomegaly", N),
    ("The heart, mediastinum, and hila are normal.", "Enlarged Cardiomediastinum", N),
    ("Borderline size of the cardiac silhouette.", "Cardiomegaly", U),
    ("Pneumothorax is very unlikely.", "Pneumothorax", N),
    ("The effusion, which was seen previously, has resolved.", "Pleural Effusion", N),  # a relative clause
    ("The nodule, which was seen on the prior study, is no longer visualized.", "Lung Lesion", N),
    ("No effusion, consolidation at the left base, or pneumothorax.", "Consolidation", N),  # the list goes on
    ("No effusion, consolidation at the left base, or pneumothorax.", "Pneumothorax", N),
    ("Atelectasis vs. pneumonia.", "Atelectasis", U),  # "vs." does not end the sentence
    ("Left lower lobe atelectasis vs. infiltrate.", "Lung Opacity", U),
    ("Plate atelectasis at the left base.", "Support Devices", A),
    ("No pneumothorax;small effusion.", "Pleural Effusion", P),
    ("Opacity which has resolved.", "Lung Opacity", N),  # a "which" clause's negation reaches back
    ("Opacity at the right base which could be atelectasis.", "Lung Opacity", P),  # its uncertainty does not
    ("The heart size is persistently enlarged.", "Cardiomegaly", P),  # any adverb between subject and predicate
    ("Lungs are without focal consolidation, large pleural effusion, or pneumothoraces.", "Pleural Effusion", N),
    ("No displaced, acute fractures are identified.", "Fracture", N),
    ("No pneumothorax, small right pleural effusion or atelectasis.", "Pleural Effusion", U),
    ("Left basilar opacity, which is likely atelectasis, and no effusion.", "Atelectasis", U),
    ("Left basilar opacity, which is likely atelectasis, and no effusion.", "Pleural Effusion", N),
    ("Right basilar opacity which is unlikely to represent pneumonia.", "Lung Opacity", P),
    ("Clinical correlation for pneumonia is recommended.", "Pneumonia", U),  # CheXpert: correlate for X
    ("No new, focal consolidation.", "Consolidation", U),
    ("Atelectasis is more likely than pneumonia.", "Atelectasis", U),
    ("Small left hydropneumothorax.", "Pneumothorax", P),
    ("Small left hydropneumothorax.", "Pleural Effusion", P),
    ("Right lower lobe bronchopneumonia.", "Pneumonia", P),
]
CONVENTION_CASES = ISSUE_TABLE + NEGATION + UNCERTAINTY + KEEPS_POSITIVE + SCOPE + LISTS + MENTIONS + REVIEW


@pytest.mark.parametrize("sentence, observation, expected", CONVENTION_CASES)
def test_conventions(sentence, observation, expected):
    assert label_report(sentence)[observation] == expected


def test_a_list_comma_continues_and_a_statement_comma_ends_the_clause():
    assert [c.strip() for _, c in clauses("no effusion, pneumothorax or consolidation")] == \
        ["no effusion, pneumothorax or consolidation"]
    assert [c.strip() for _, c in clauses("no pneumothorax, small right pleural effusion")] == \
        ["no pneumothorax", ", small right pleural effusion"]


def test_positive_beats_uncertain_beats_negative_within_a_report():
    assert label_report("No effusion. Possible effusion on the left.")["Pleural Effusion"] == U
    assert label_report("Possible effusion. There is a left effusion.")["Pleural Effusion"] == P
    assert label_report("Heart size upper limits of normal. Borderline cardiomegaly.")["Cardiomegaly"] == U


@pytest.mark.parametrize("report, expected", [
    ("No pleural effusion or pneumothorax. Normal heart.", P),
    ("No acute cardiopulmonary abnormality.", P),
    ("Pacemaker in place. Lungs are clear.", P),  # support devices aside
    ("Degenerative changes of the thoracic spine. Lungs are clear.", P),  # spine terms are ignored
    ("Possible atelectasis.", N),  # an uncertain finding is a finding
    ("Calcified granuloma in the left upper lobe. No acute disease.", N),
    ("", A), ("XXXX", A), (".", A), ("  ", A),  # meaningless text is not a normal report
])
def test_no_finding_follows_chexpert(report, expected):
    assert label_report(report)["No Finding"] == expected


def test_every_observation_is_labelled_even_for_non_text():
    labels = label_report(None)
    assert set(labels) == set(OBSERVATIONS) and set(CHEXPERT_14) <= set(labels)
    assert all(v == A for v in labels.values())


def test_held_out_rule_is_the_odd_tens_digit():
    assert [is_held_out(u) for u in ("CXR3", "CXR13", "CXR23", "CXR1913", "CXR2003")] == \
        [False, True, False, True, False]
    with pytest.raises(ValueError, match="'abc'"):
        is_held_out("abc")


def test_mesh_agreement_counts_on_known_input():
    texts = ["Cardiomegaly.", "Cardiomegaly.", "No acute disease.", "Cardiomegaly."]
    mesh = [["Cardiomegaly/mild"], ["normal"], ["Cardiomegaly"], ["No Indexing"]]
    result = mesh_agreement(texts, mesh)
    cardio = result["per_observation"]["Cardiomegaly"]
    assert result["n_reports"] == 3  # "No Indexing" left out
    assert (cardio["true_positive"], cardio["predicted"], cardio["support"]) == (1, 2, 2)
    assert cardio["precision"] == pytest.approx(0.5) and cardio["recall"] == pytest.approx(0.5)
    assert result["observations_with_support"] == ["Cardiomegaly"]
    assert result["macro_F1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 texts but 1"):
        mesh_agreement(texts[:2], mesh[:1])


# Floors below what the labeler measures on the whole sample (findings + impression); each observation
# with a MeSH term is held to a precision AND a recall floor. Lung Opacity's precision is lower by
# definition: CheXpert counts "interstitial markings" as Lung Opacity, MeSH indexes them as "Markings".
FLOORS = {"Cardiomegaly": (0.85, 0.80), "Atelectasis": (0.90, 0.70), "Pleural Effusion": (0.85, 0.80),
          "Lung Opacity": (0.80, 0.90), "Lung Lesion": (0.65, 0.85), "Edema": (0.90, 0.90),
          "Pneumonia": (0.60, 0.90), "Consolidation": (0.90, 0.70), "Fracture": (0.70, 0.90)}


def test_labeler_agrees_with_mesh_terms_of_the_real_sample(iuxray_sample):
    table = sample_agreement(iuxray_sample / "reports", subset="all")
    assert set(FLOORS) == set(MESH_TERMS)
    for obs, (precision, recall) in FLOORS.items():
        row = table.loc[obs]
        assert row["support"] > 0, obs
        assert row["precision"] >= precision and row["recall"] >= recall, (obs, row.to_dict())


def test_held_out_macro_f1_meets_the_target(iuxray_sample):
    table = sample_agreement(iuxray_sample / "reports", subset="held_out")
    assert table.attrs["n_reports"] > 150
    assert table.iloc[-1]["f1"] >= 0.90, table


def test_mesh_agreement_intervals_are_seeded_and_hold_the_point():
    texts = ["Cardiomegaly.", "Cardiomegaly.", "No acute disease.", "Small left pleural effusion."] * 10
    mesh = [["Cardiomegaly/mild"], ["normal"], ["Cardiomegaly"], ["Pleural Effusion/left"]] * 10
    result = mesh_agreement(texts, mesh, n_resamples=200, seed=3)
    assert result == mesh_agreement(texts, mesh, n_resamples=200, seed=3)
    point = mesh_agreement(texts, mesh)  # the intervals leave the figures as they were
    assert point["macro_F1"] == result["macro_F1"] == pytest.approx(0.75)
    cardio, effusion = result["per_observation"]["Cardiomegaly"], result["per_observation"]["Pleural Effusion"]
    assert cardio["f1"] == point["per_observation"]["Cardiomegaly"]["f1"] == pytest.approx(0.5)
    assert cardio["f1_ci95"][0] < cardio["f1"] < cardio["f1_ci95"][1]
    assert effusion["f1_ci95"] == [1.0, 1.0]  # every draw agrees
    assert result["macro_F1_ci95"][0] < result["macro_F1"] < result["macro_F1_ci95"][1]


def test_agreement_command_prints_each_observation_with_support_and_intervals(iuxray_sample, capsys):
    from medexgen_lib.labeler_agreement import main

    reports = iuxray_sample / "reports"
    assert main(["--reports", str(reports), "--resamples", "100", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["--reports", str(reports), "--resamples", "100", "--seed", "1"]) == 0
    again = capsys.readouterr().out
    strip = lambda out: out.split("labeling speed")[0]  # noqa: E731 (the timing varies)
    assert strip(first) == strip(again)  # seeded
    table = sample_agreement(reports, "all", n_resamples=100, seed=1)
    assert "all: 389 MeSH-indexed reports" in first and "f1 low" in first and "support" in first
    for obs in (*MESH_TERMS, "macro (observations with support)"):
        row = table.loc[obs]
        assert row["f1 low"] <= row["f1"] <= row["f1 high"], obs
        assert f"{row['f1']:.3f}" in first and f"{row['f1 low']:.3f}" in first
    assert "tuning:" in first and "held_out:" in first  # the bundled sample's halves too


@pytest.mark.reliability
def test_agreement_command_names_a_missing_reports_folder(tmp_path, capsys):
    from medexgen_lib.labeler_agreement import main

    assert main(["--reports", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["--reports", str(tmp_path / "empty")]) == 1
    assert "empty" in capsys.readouterr().err


def test_labeling_speed_is_measured_without_the_memo():
    from medexgen_lib.labeler import _label_text
    before = _label_text.cache_info()
    assert labeling_seconds_per_100(["No acute disease."], n_reports=10) > 0
    after = _label_text.cache_info()  # every report labelled afresh: no memo hit nor entry
    assert (after.hits, after.misses) == (before.hits, before.misses)
    with pytest.raises(ValueError, match="no texts"):
        labeling_seconds_per_100([])


def test_labeler_version_reaches_metrics_and_fingerprint(monkeypatch):
    from medexgen_lib import validation
    from medexgen_lib.config import Config
    from medexgen_lib.metrics import score

    assert score(["Cardiomegaly."], ["Cardiomegaly."])["labeler_version"] == LABELER_VERSION
    digest, payload = validation.evaluation_fingerprint(Config(), ["CXR1"])
    assert payload["labeler_version"] == LABELER_VERSION
    monkeypatch.setattr(validation, "LABELER_VERSION", LABELER_VERSION + "-changed")
    assert validation.evaluation_fingerprint(Config(), ["CXR1"])[0] != digest


def test_memoised_labels_are_a_fresh_dict_each_call():
    first = label_report("Small left pleural effusion.")
    first["Pleural Effusion"] = "negative"
    first.clear()
    again = label_report("Small left pleural effusion.")
    assert again["Pleural Effusion"] == "positive" and len(again) == len(OBSERVATIONS)
    assert label_report(None) == label_report("")  # not a string: read as empty, as before
