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


def _refused_by_argparse(call, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.reliability
@pytest.mark.parametrize("seeds", ["0", "-3"])
def test_run_with_no_seeds_is_refused_before_any_stage(seeds, monkeypatch, capsys, tmp_path):
    import medexgen_lib.__main__ as cli

    ran = []
    monkeypatch.setattr(cli, "run_pipeline", lambda *args, **kwargs: ran.append(args) or [])
    error = _refused_by_argparse(lambda: main(["run", "--seeds", seeds, "-p", "paths.output_dir",
                                               str(tmp_path / "out")]), capsys)
    assert f"argument --seeds: must be a whole number of at least 1, got {seeds!r}" in error
    assert ran == [] and not (tmp_path / "out").exists()


@pytest.mark.reliability
@pytest.mark.parametrize("seeds", ["0", "-1"])
def test_an_ablation_with_no_seeds_leaves_every_row_and_the_table_as_they_were(seeds, tmp_path, capsys):
    from medexgen_lib import ablation

    out = tmp_path / "out"
    files = {out / "ablation" / ablation._slug(name) / ablation.ROW_FILE: f'{{"seeds": [0, 1, 2], "row": "{name}"}}'
             for name in ablation.ROWS}
    files.update({out / "logs" / "ablation.md": "| the finished table |\n",
                  out / "logs" / "ablation.json": '{"rows": "finished"}'})
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    error = _refused_by_argparse(lambda: ablation.main(["--seeds", seeds, "-p", "paths.output_dir", str(out),
                                                        "-p", "paths.data_dir", str(tmp_path / "data")]), capsys)
    assert "--seeds" in error
    assert {path: path.read_text() for path in files} == files
    with pytest.raises(ValueError, match="at least 1"):  # called directly, the same check
        ablation.run_ablation("demo", {"paths.output_dir": str(out)}, n_seeds=int(seeds))
    assert {path: path.read_text() for path in files} == files
