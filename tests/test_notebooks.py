"""The numbered notebooks headless with papermill: the whole demo pipeline (the end-to-end
test), --from, and a failing stage's message."""

import json
import signal
import subprocess
import sys
import time

import nbformat
import pytest

from medexgen_lib.__main__ import main
from medexgen_lib.pipeline import StageFailed, list_stages, run_pipeline

from conftest import SMALL_DATA_SPLIT

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # The demo's settings, shortened to what these assertions need: 5 epochs (the last one on
    # the frozen encoder's cached features) and 500 studies (350 / 50 / 100) instead of 800
    # (350 / 50 / 400). The slow learning proof runs the demo as shipped, in full; the README's
    # demo command is timed on it.
    overrides = {"paths.data_dir": str(root / "data"), "paths.output_dir": str(root / "out"),
                 "train.epochs": 5, "train.encoder_epochs": 4, "data.n_phantom_studies": 500,
                 **SMALL_DATA_SPLIT}
    return root, overrides, run_pipeline("demo", overrides)


def test_whole_demo_pipeline_runs_headless(demo_run):
    root, _, results = demo_run
    assert [r.stage for r in results] == list(list_stages())
    assert all(r.status == "ok" for r in results)
    out, data = root / "out", root / "data"
    assert (data / "processed" / "studies.parquet").exists()
    assert json.loads((out / "logs" / "eda_stats.json").read_text())["reports"] == 500
    assert (data / "processed" / "tokenizer" / "source.json").exists()
    assert (out / "models" / "final" / "model.safetensors").exists()
    metrics = json.loads((out / "logs" / "metrics_test.json").read_text())
    constant = metrics["baselines"]["constant (most frequent)"]["clinical macro_F1"]
    assert metrics["model"]["clinical macro_F1"] > constant + 0.2  # better than the constant report
    executed = json.loads((out / "logs" / "notebooks" / "01_acquisition.ipynb").read_text())
    outputs = "".join(str(o) for c in executed["cells"] for o in c.get("outputs", []))
    assert "generated phantom set: 500 studies" in outputs
    summary = json.loads((out / "logs" / "run_summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok"] * len(results)
    assert any(o.endswith("metrics_test.json") for o in summary["stages"][4]["outputs"])


def test_from_reruns_only_the_later_stages(demo_run, capsys):
    root, overrides, _ = demo_run
    studies = root / "data" / "processed" / "studies.parquet"
    before = studies.stat().st_mtime_ns
    args = [a for k, v in overrides.items() for a in ("-p", k, str(v))]
    assert main(["run", "--profile", "demo", "--from", "02", "--to", "02", *args]) == 0  # the quickest stage
    printed = capsys.readouterr().out
    assert "02_eda.ipynb" in printed and "01_acquisition" not in printed and "03_preprocessing" not in printed
    assert studies.stat().st_mtime_ns == before


def _write_stages(folder, stages: dict[str, str]):
    """Numbered notebooks, each a parameters cell and one code cell."""
    folder.mkdir()
    for name, source in stages.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        params = nbformat.v4.new_code_cell("profile = 'demo'\noverrides = {}")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(source)]
        nbformat.write(nb, folder / name)
    return folder


@pytest.mark.reliability
def test_a_failing_stage_is_reported_briefly_and_earlier_outputs_stay(tmp_path):
    notebooks = _write_stages(tmp_path / "notebooks", {
        "01_fine.ipynb": "open('made_by_01.txt', 'w').write('ok')",
        "02_broken.ipynb": "x = 1\nraise ValueError('the input table is empty')"})
    overrides = {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out")}
    with pytest.raises(StageFailed) as info:
        run_pipeline("demo", overrides, notebooks_dir=notebooks)
    message = str(info.value)
    assert "02_broken.ipynb" in message and "ValueError: the input table is empty" in message
    assert "cell" in message and "--from 02" in message and len(message.splitlines()) <= 3
    assert (notebooks / "made_by_01.txt").read_text() == "ok"
    summary = json.loads((tmp_path / "out" / "logs" / "run_summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "failed"]


@pytest.mark.reliability
def test_stage_without_its_input_names_the_notebook_that_makes_it(tmp_path):
    overrides = {"paths.data_dir": str(tmp_path / "empty"), "paths.output_dir": str(tmp_path / "out")}
    with pytest.raises(StageFailed) as info:
        run_pipeline("demo", overrides, start="02", stop="02")
    assert "02_eda.ipynb" in str(info.value) and "run notebook 01_acquisition first" in str(info.value)


RUNNER = """
import sys
from pathlib import Path
import medexgen_lib.__main__ as cli
run_pipeline = cli.run_pipeline
cli.run_pipeline = lambda *args, **kwargs: run_pipeline(*args, notebooks_dir=Path(sys.argv[1]), **kwargs)
sys.exit(cli.main(["run", "-p", "paths.data_dir", sys.argv[2], "-p", "paths.output_dir", sys.argv[3]]))
"""


LONG_CELL = "import time\nopen('started_02.txt', 'w').write('')\ntime.sleep(300)"
DEAF_CELL = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + LONG_CELL


@pytest.mark.reliability
@pytest.mark.parametrize("signals, cell", [
    ([signal.SIGINT], LONG_CELL), ([signal.SIGTERM], LONG_CELL),
    ([signal.SIGINT, signal.SIGINT], DEAF_CELL),  # a cell deaf to Ctrl-C: the second one kills it
], ids=["ctrl-c", "sigterm", "ctrl-c-twice"])
def test_ctrl_c_or_sigterm_interrupts_the_running_stage(signals, cell, tmp_path):
    notebooks = _write_stages(tmp_path / "notebooks", {
        "01_fine.ipynb": "open('made_by_01.txt', 'w').write('ok')",
        "02_long.ipynb": cell,
        "03_never.ipynb": "open('made_by_03.txt', 'w').write('ok')"})
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(notebooks), str(tmp_path / "data"),
                               str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (notebooks / "started_02.txt").exists() and time.time() < deadline:
        time.sleep(0.2)
    for signum in signals:
        runner.send_signal(signum)
        time.sleep(1)
    _, stderr = runner.communicate(timeout=60)
    assert runner.returncode == 130
    message = stderr.strip().splitlines()[-1]
    where = "(its kernel was killed)" if len(signals) == 2 else "in cell 2"
    assert message.startswith(f"interrupted: stage 02 (02_long.ipynb) interrupted {where}")
    assert "--from 02" in message and "train --resume" not in message  # that hint is for stage 04
    assert (notebooks / "made_by_01.txt").read_text() == "ok" and not (notebooks / "made_by_03.txt").exists()
    summary = json.loads((tmp_path / "out" / "logs" / "run_summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok", "interrupted"]
