"""A headless run a person can watch: compact progress lines, warnings, nothing else."""

import gc
import logging
import sys

import nbformat
import pytest

from medexgen_lib import progress
from medexgen_lib.pipeline import run_pipeline
from medexgen_lib.progress import ProgressBar, StageProgress

from conftest import TINY as TRAINING_TINY

TINY = {**TRAINING_TINY, "train.log_with": "none"}


def _messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def test_stage_progress_passes_progress_and_warnings_only(caplog):
    logger = logging.getLogger("test.runner")
    sink = StageProgress("04", logger)
    with caplog.at_level(logging.INFO, logger="test.runner"):
        for chunk in ["INFO medexgen_lib.train: 40 train studi", "es\nINFO medexgen_lib.progress: epoch 1/",
                      "3: train loss 2.5000, val loss 2.4, val clinical macro_F1 0.1000\n",
                      "[transformers] `loss_type=None` was set\n",
                      "WARNING medexgen_lib.train: !!!!\nRESUMING WITH A CHANGED VALIDATION SETUP\n",
                      "INFO medexgen_lib.model: quiet again\nnot shown\n",
                      "INFO medexgen_lib.progress: generating: 3/9 batch (33%), 10 s"]:
            sink.write(chunk)
        sink.close()
    assert _messages(caplog) == [
        "[04] epoch 1/3: train loss 2.5000, val loss 2.4, val clinical macro_F1 0.1000",
        "[04] WARNING medexgen_lib.train: !!!!", "[04] RESUMING WITH A CHANGED VALIDATION SETUP",
        "[04] generating: 3/9 batch (33%), 10 s"]


def test_a_long_logged_traceback_keeps_its_exception_line(caplog):
    """A traceback past the continuation limit still shows the line that says what went wrong."""
    logger = logging.getLogger("test.runner")
    sink = StageProgress("05", logger)
    frames = "".join(f'  File "/lib/m{i}.py", line {i}, in f{i}\n    call_{i}()\n' for i in range(15))
    with caplog.at_level(logging.INFO, logger="test.runner"):
        sink.write("ERROR medexgen_lib.evaluate: scoring failed\nTraceback (most recent call last):\n"
                   + frames + "ValueError: reference 17 is empty\n[transformers] chatter\n"
                   "INFO medexgen_lib.model: quiet again\nnot shown\n")
        sink.close()
    shown = _messages(caplog)
    assert shown[0] == "[05] ERROR medexgen_lib.evaluate: scoring failed"
    assert shown[-1] == "[05] ValueError: reference 17 is empty"
    assert len(shown) < 25 and not any("chatter" in m or "not shown" in m for m in shown)


def test_progress_bar_logs_lines_while_it_runs_and_when_done(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger=progress.PROGRESS_LOGGER):
        bar = ProgressBar(total=4, desc="epoch 1/2", unit="batch")
        for _ in range(4):
            bar.update(1)
        bar.close()
        assert list(ProgressBar(range(3), desc="generating", mininterval=0)) == [0, 1, 2]
        assert list(ProgressBar(range(4), desc="quiet", disable=True)) == [0, 1, 2, 3]
    lines = _messages(caplog)
    assert lines[0].startswith("epoch 1/2: 1/4 batch (25%)") and lines[3].startswith("epoch 1/2: 4/4 batch (100%)")
    assert lines[4].startswith("epoch 1/2: done, 4 batch in")
    assert lines[-1].startswith("generating: done, 3 it in") and not any("quiet" in line for line in lines)


def test_a_bar_whose_set_up_fails_raises_only_that_error(monkeypatch):
    """tqdm's __del__ closes a bar whose __init__ raised; that close must not raise again."""
    unraised = []
    monkeypatch.setattr(sys, "unraisablehook", unraised.append)
    with pytest.raises(KeyError, match="no_such_option"):  # tqdm refuses an unknown option
        ProgressBar(range(3), desc="bad", no_such_option=1)
    gc.collect()
    assert [str(u.exc_value) for u in unraised] == []


TRAIN_CELL = f"""
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import load_config
from medexgen_lib.preprocess import run_preprocessing
from medexgen_lib.train import train
cfg = load_config(profile, {{**overrides, **{TINY!r}}})
build_studies_table(cfg, acquire(cfg))
run_preprocessing(cfg)
print("raw cell output")
train(cfg)
logging.getLogger("medexgen_lib.train").warning("a warning a user can act on")
"""


@pytest.mark.notebook
def test_runner_shows_epoch_progress_and_no_kernel_transport_warning(tmp_path, caplog, capfd):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("profile = 'demo'\noverrides = {}")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(TRAIN_CELL)]
    nbformat.write(nb, folder / "04_training.ipynb")
    overrides = {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out")}
    with caplog.at_level(logging.INFO, logger="medexgen_lib.pipeline"):
        run_pipeline("demo", overrides, notebooks_dir=folder)
    shown = [r.getMessage() for r in caplog.records if r.name == "medexgen_lib.pipeline"]
    ends = [m for m in shown if m.startswith("[04] epoch ") and "train loss" in m]
    assert [m.split(":")[0] for m in ends] == ["[04] epoch 1/2", "[04] epoch 2/2"]
    assert all("val clinical macro_F1" in m for m in ends)
    assert "[04] WARNING medexgen_lib.train: a warning a user can act on" in shown
    assert not any("raw cell output" in m or "medexgen_lib.preprocess" in m for m in shown)
    terminal = capfd.readouterr()
    assert "without encryption" not in terminal.err + terminal.out
    assert "raw cell output" not in terminal.err + terminal.out


@pytest.mark.notebook
def test_the_runner_shows_its_own_lines_not_papermills(tmp_path, caplog, capfd):
    """papermill's "Input Notebook / Output Notebook / Working directory / Executing notebook"
    lines stay off the terminal (the CLI logs everything at INFO to it, as caplog does here)."""
    from test_notebooks import _write_stages

    papermill_level = logging.getLogger("papermill").level
    folder = _write_stages(tmp_path / "notebooks", {"01_trivial.ipynb": "print('done')"})
    overrides = {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out")}
    with caplog.at_level(logging.INFO):
        run_pipeline("demo", overrides, notebooks_dir=folder)
    terminal = capfd.readouterr()
    shown = caplog.text + terminal.out + terminal.err
    assert "stage 01: 01_trivial.ipynb" in shown  # the runner's own line
    for papermills in ("Input Notebook", "Output Notebook", "Working directory", "Executing notebook"):
        assert papermills not in shown
    assert logging.getLogger("papermill").level == papermill_level  # as it was before the run
