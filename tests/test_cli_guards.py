"""Command-line arguments that would destroy a user's files are refused before anything is
touched: `score X --out X`, `--seeds 0` of `run` and of the ablation."""

import os

import pytest

from medexgen_lib.__main__ import main

PREDICTIONS = ("uid,prediction,reference\n"
               "CXR1,No pleural effusion.,No pleural effusion.\n"
               "CXR2,Small effusion.,Cardiomegaly.\n")


@pytest.mark.reliability
@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hard link"])
def test_score_refuses_to_write_its_metrics_over_the_predictions_file(spelling, tmp_path, monkeypatch, capsys):
    predictions = tmp_path / "preds.csv"
    predictions.write_text(PREDICTIONS)
    monkeypatch.chdir(tmp_path)
    out = {"same": str(predictions), "relative": "../" + tmp_path.name + "/./preds.csv",
           "symlink": "link.csv", "hard link": "hard.csv"}[spelling]
    if spelling == "symlink":
        os.symlink(predictions, tmp_path / "link.csv")
    elif spelling == "hard link":
        os.link(predictions, tmp_path / "hard.csv")
    code = main(["score", "preds.csv", "--out", out, "-p", "paths.data_dir", str(tmp_path / "data")])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "preds.csv" in error[0] and "--out" in error[0], error
    assert predictions.read_text() == PREDICTIONS
