"""Scoring conventions: macro-F1 that charges invented findings, degenerate predictions,
R2Gen's reference convention, and the real METEOR path."""

import shutil

import pytest

from medexgen_lib.labeler import label_report
from medexgen_lib.metrics import (R2GEN_MAX_SEQ_LENGTH, clinical_metrics, is_degenerate, per_sample_text_scores,
                                  r2gen_text, r2gen_vocabulary, score, scored_texts, text_metrics)

OBS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax")


def test_inventing_an_absent_finding_costs_macro_f1():
    refs = [label_report(t) for t in ["Cardiomegaly.", "Left pleural effusion."]]
    honest = [label_report(t) for t in ["Cardiomegaly.", "Left pleural effusion."]]
    inventive = [label_report(t) for t in ["Cardiomegaly. Right pneumothorax.", "Left pleural effusion."]]
    a, b = clinical_metrics(refs, honest, OBS), clinical_metrics(refs, inventive, OBS)
    # Over observations in the references the invented pneumothorax is invisible ...
    assert a["macro_F1 (observations in references)"] == b["macro_F1 (observations in references)"] == 1.0
    # ... over observations in references OR predictions it is averaged in with F1 0.
    assert a["macro_F1 (observations in references or predictions)"] == 1.0
    assert b["macro_F1 (observations in references or predictions)"] == pytest.approx(2 / 3)
    assert b["macro_F1"] == b["macro_F1 (observations in references or predictions)"]  # the primary key


@pytest.mark.parametrize("text, degenerate", [
    ("", True), ("   \n", True), (". . ,", True), ("1. 2.", True), ("xxxx xxxx xxxx", True),
    ("effusion effusion effusion effusion", True), ("No effusion.", False),
    ("Heart size normal. Lungs clear.", False)])
def test_degenerate_predictions(text, degenerate):
    assert is_degenerate(text) is degenerate


def test_empty_or_garbage_predictions_are_counted_and_get_no_no_finding_credit():
    refs = ["No acute disease.", "Heart size normal. Lungs clear.", "Heart size normal. Lungs clear."]
    preds = ["", "xxxx xxxx", "Heart size normal. Lungs clear."]
    result = score(refs, preds)
    assert result["empty_predictions"] == 1 and result["degenerate_predictions"] == 2
    assert result["degenerate_predictions_share"] == pytest.approx(2 / 3)
    no_finding = result["clinical per_observation"]["No Finding"]
    assert (no_finding["support"], no_finding["predicted"]) == (3, 1)  # only the real report counts
    assert no_finding["recall"] == pytest.approx(1 / 3)


def test_r2gen_vocabulary_threshold_and_truncation_follow_r2gens_tokenizer():
    training = ["Heart size normal."] * 3 + ["Rare word twice."] * 2
    vocabulary = r2gen_vocabulary(training)
    # seen 3 times: kept; seen twice: <unk> (R2Gen: counter[k] >= threshold 3)
    assert {"heart", "size", "normal", "."} <= vocabulary and "rare" not in vocabulary
    assert r2gen_text("1. Heart size normal. Rare word.", vocabulary) == "heart size normal . <unk> <unk> ."
    long_report = "Heart size normal. " * 30  # 120 words with the full stops
    cut = r2gen_text(long_report, vocabulary, R2GEN_MAX_SEQ_LENGTH - 1)
    assert len(cut.split()) == 59 and cut.split()[:4] == ["heart", "size", "normal", "."]


def test_r2gen_reference_convention_scores_against_cut_references():
    training = ["Heart size normal. Lungs clear."] * 3
    reference = "Heart size normal. Lungs clear. " * 12  # 72 words with the stops
    prediction = " ".join(r2gen_text(reference, r2gen_vocabulary(training), 59).split())  # first 59 words
    full = score([reference], [prediction])
    r2gen = score([reference], [prediction], reference_convention="r2gen", training_reports=training)
    assert full["references"] == "full" and r2gen["references"] == "r2gen"
    assert "59 words" in r2gen["reference_convention"] and "<unk>" in r2gen["reference_convention"]
    # the prediction is the cut reference plus the final " ." normalisation adds: 59 of 60 words match
    assert r2gen["BLEU-1"] == pytest.approx(59 / 60, abs=1e-6)
    assert full["BLEU-1"] < 0.9  # brevity penalty against the whole 72-word reference
    with pytest.raises(ValueError, match="training reports"):
        score([reference], [prediction], reference_convention="r2gen")
    with pytest.raises(ValueError, match="reference convention"):
        score([reference], [prediction], reference_convention="published")


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 runs in Java; no java on PATH")
def test_meteor_runs_for_real_with_java():
    refs = ["heart size is normal. no pleural effusion.", "left pleural effusion."]
    same = text_metrics(refs, refs, meteor=True)
    assert "METEOR_skipped" not in same and same["METEOR"] == pytest.approx(1.0, abs=1e-6)


def test_r2gen_references_from_a_small_training_split_warn_that_unk_matches_inflate_scores():
    refs = ["The heart is normal in size. The lungs are clear.", "Small right pleural effusion."]
    garbage = ["zebra giraffe elephant.", "walrus otter."]  # no word of any reference
    tiny = score(refs, garbage, reference_convention="r2gen", training_reports=refs[:1])
    # every word of these predictions and most reference words became <unk>, which match each other
    assert tiny["r2gen_unk_share_predictions"] == 1.0  # even "." is seen only twice in one report
    assert tiny["r2gen_unk_share_references"] > 0.5 and tiny["r2gen_training_reports"] == 1
    assert tiny["ROUGE-L"] > score(refs, garbage)["ROUGE-L"] + 0.2  # the inflation being warned about
    assert len(tiny["warnings"]) == 1 and "inflated" in tiny["warnings"][0] and "1 training" in tiny["warnings"][0]
    assert score(refs, garbage)["warnings"] == []
    assert "r2gen_unk_share_references" not in score(refs, garbage)


def test_empty_predictions_score_zero_on_every_text_metric():
    refs = ["The heart is normal in size. The lungs are clear.", "Small right pleural effusion."]
    for convention in ("full", "r2gen"):
        result = score(refs, ["", " . "], reference_convention=convention, training_reports=refs * 3)
        # before: normalisation turned "" into " .", which matched each reference's full stops
        keys = [k for k in result if k.startswith(("BLEU-", "ROUGE-", "CIDEr", "rouge-score ", "nltk sentence BLEU-"))]
        assert len(keys) == 13 and {k: result[k] for k in keys} == dict.fromkeys(keys, 0.0)
    # the nltk sentence BLEU of the README's example (was .024: "" normalised to " ." matched a full stop)
    nltk = score(["Heart normal.", "No effusion."], ["", ""])
    assert [nltk[f"nltk sentence BLEU-{n}"] for n in range(1, 5)] == [0.0] * 4
    assert score(refs, ["", "Small right pleural effusion."])["ROUGE-L"] == pytest.approx(0.5)
    assert per_sample_text_scores(refs[0], "")["ROUGE-L"] == 0.0


def _overrides(cfg) -> list[str]:
    return ["-p", "paths.data_dir", cfg.paths.data_dir, "-p", "paths.output_dir", cfg.paths.output_dir]


@pytest.mark.reliability
@pytest.mark.parametrize("suffix, content", [
    (".csv", "uid,prediction,reference\nCXR1,a b,The heart is normal.\nCXR2,c d,\n"),
    (".json", '[{"uid": "CXR1", "prediction": "a b", "reference": "The heart is normal."},'
              ' {"uid": "CXR2", "prediction": "c d", "reference": "  "}]'),
])
def test_an_empty_reference_cell_is_refused_naming_the_file_and_row(suffix, content, tmp_config, tmp_path,
                                                                     capsys):
    """Rows whose reference cell was empty were scored against nothing (BLEU-1 .33, clinical
    example_F1 1.0) with exit 0."""
    from medexgen_lib.__main__ import main
    from medexgen_lib.evaluate import score_predictions_file

    cfg = tmp_config()
    path = tmp_path / f"preds{suffix}"
    path.write_text(content)
    message = f"predictions file {path}, row 2 \\(CXR2\\): the 'reference' is empty"
    with pytest.raises(ValueError, match=message):
        score_predictions_file(path, cfg)
    assert main(["score", str(path), *_overrides(cfg)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "row 2 (CXR2)" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("suffix", [".csv", ".json"])
@pytest.mark.parametrize("reference", [".", "XXXX", "XXXX. XXXX.", "\u200b", " - ; "])
def test_a_reference_with_no_words_once_cleaned_is_refused(suffix, reference, tmp_config, tmp_path, capsys):
    """A reference of ".", "XXXX" or a zero-width space was scored as if it were a report."""
    import json

    from medexgen_lib.__main__ import main
    from medexgen_lib.evaluate import score_predictions_file

    cfg = tmp_config()
    rows = [{"uid": "CXR1", "prediction": "a b", "reference": "The heart is normal."},
            {"uid": "CXR2", "prediction": "c d", "reference": reference}]
    path = tmp_path / f"preds{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("uid,prediction,reference\n" + "".join(f"{r['uid']},{r['prediction']},{r['reference']}\n"
                                                                for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"predictions file {path}, row 2 \(CXR2\): the 'reference' .* has "
                                         "no words once cleaned"):
        score_predictions_file(path, cfg)
    assert main(["score", str(path), *_overrides(cfg)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(path) in error[0] and "row 2 (CXR2)" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["link to /dev/zero", "FIFO"])
def test_a_predictions_file_that_is_not_a_regular_file_is_refused(kind, tmp_config, tmp_path, capsys):
    """A predictions file linked to /dev/zero ended in a MemoryError; a FIFO made score hang."""
    import os

    from medexgen_lib.__main__ import main

    cfg = tmp_config()
    path = tmp_path / "preds.csv"
    if kind == "FIFO":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    assert main(["score", str(path), *_overrides(cfg)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: predictions file {path} is not a regular file (a device, FIFO or socket)"]


@pytest.mark.reliability
def test_an_integer_of_thousands_of_digits_in_a_predictions_file_is_named(tmp_config, tmp_path, capsys):
    from medexgen_lib.__main__ import main

    cfg = tmp_config()
    path = tmp_path / "preds.json"
    path.write_text('[{"uid": "CXR1", "prediction": "a b", "reference": "x y", "n": ' + "9" * 5000 + "}]")
    assert main(["score", str(path), *_overrides(cfg)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"cannot read predictions file {path}" in error[0] and "4300" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("row, field, kind", [
    ('{"uid": "CXR2", "prediction": 5, "reference": "x y"}', "prediction", "int"),
    ('{"uid": "CXR2", "prediction": ["a", "b"], "reference": "x y"}', "prediction", "list"),
    ('{"uid": "CXR2", "prediction": NaN, "reference": "x y"}', "prediction", "float"),
    ('{"uid": "CXR2", "prediction": "a b", "reference": 7}', "reference", "int"),
    ('{"uid": "CXR2", "prediction": {"text": "a"}, "reference": "x y"}', "prediction", "dict"),
])
def test_a_prediction_or_reference_that_is_not_text_is_named(row, field, kind, tmp_config, tmp_path, capsys):
    """These ended in an AttributeError traceback ('int' object has no attribute 'split')."""
    from medexgen_lib.__main__ import main

    cfg = tmp_config()
    path = tmp_path / "preds.json"
    path.write_text(f'[{{"uid": "CXR1", "prediction": "a b", "reference": "x y"}}, {row}]')
    assert main(["score", str(path), *_overrides(cfg)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: predictions file {path}, row 2 (CXR2): '{field}' must be text, got {kind}"]


@pytest.mark.reliability
def test_predictions_nested_too_deep_are_named(tmp_config, tmp_path, capsys):
    """100k-deep JSON ended in a RecursionError naming no file."""
    from medexgen_lib.__main__ import main

    cfg = tmp_config()
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["score", str(path), *_overrides(cfg)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: cannot read predictions file {path}: ")


@pytest.mark.reliability
def test_an_unknown_split_is_named(tmp_config, tmp_path, capsys):
    """score ok.csv --split bogus ended in KeyError: 'bogus'."""
    import json

    from medexgen_lib.__main__ import main

    cfg = tmp_config()
    cfg.paths.processed.mkdir(parents=True)
    (cfg.paths.processed / "splits.json").write_text(json.dumps({"train": ["CXR9"], "val": [], "test": ["CXR1"]}))
    path = tmp_path / "ok.csv"
    path.write_text("uid,prediction,reference\nCXR1,a b,The heart is normal.\n")
    assert main(["score", str(path), *_overrides(cfg), "--split", "bogus"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["error: split 'bogus' is not one of train, val, test"]
    assert main(["score", str(path), *_overrides(cfg), "--split", "test"]) == 0


@pytest.mark.reliability
def test_a_csv_with_a_utf8_byte_order_mark_is_read(tmp_config, tmp_path):
    """Excel writes a BOM before the header: the first column was read as '\\ufeffuid' and the
    file refused as having no uid column."""
    from medexgen_lib.evaluate import read_predictions_file

    path = tmp_path / "excel.csv"
    path.write_bytes("uid,prediction,reference\nCXR1,Heart normal.,The heart is normal.\n".encode("utf-8-sig"))
    assert read_predictions_file(path) == [{"uid": "CXR1", "prediction": "Heart normal.",
                                            "reference": "The heart is normal."}]
    path.write_bytes('[{"uid": "CXR1", "prediction": "a"}]'.encode("utf-8-sig"))
    assert read_predictions_file(path.rename(tmp_path / "excel.json"))[0]["uid"] == "CXR1"


def test_r2gen_mimic_references_use_r2gens_mimic_threshold_and_length():
    training = ["heart normal ."] * 10 + ["effusion present ."] * 5
    reference = " ".join(["heart"] * 120)
    for convention, cut, rare in (("r2gen", 59, "effusion"), ("r2gen-mimic", 99, "<unk>")):
        refs, preds = scored_texts([reference], ["effusion present ."], convention, training)
        assert len(refs[0].split()) == cut
        assert preds[0].split()[0] == rare  # seen 5 times: kept at threshold 3, <unk> at threshold 10
    metrics = score(["heart normal ."], ["heart normal ."], reference_convention="r2gen-mimic", training_reports=training)
    assert metrics["references"] == "r2gen-mimic" and "fewer than 10 times" in metrics["reference_convention"]
    assert "max_seq_length 100" in metrics["reference_convention"]


def test_r2gen_mimic_drops_mimics_deidentification_marks_as_r2gens_mimic_cleaner_does():
    # R2Gen's clean_report_mimic_cxr turns "___" into "_" and strips "_": the mark is no word there;
    # data.source mimic writes it as XXXX (IU X-Ray's token, which R2Gen's IU cleaner keeps as "xxxx")
    training = ["compared to XXXX the heart is normal ."] * 12
    reference, prediction = "Compared to XXXX, the heart is normal.", "xxxx the heart is normal ."
    refs, preds = scored_texts([reference], [prediction], "r2gen-mimic", training)
    assert refs == ["compared to the heart is normal ."] and preds == ["the heart is normal ."]
    refs, preds = scored_texts([reference], [prediction], "r2gen", training)
    assert refs == ["compared to xxxx the heart is normal ."] and preds[0].startswith("xxxx ")
