"""One run per folder: a second `train` or `run` into a folder in use stops naming the process
that holds it; a killed run's lock is taken over; the runner's own stage kernels share its lock."""

import json
import os
import signal
import subprocess
import sys

import pytest

from medexgen_lib.locks import LOCK_FILE, FolderInUse, folder_lock

from conftest import TINY
from test_train import prepared_data  # noqa: F401 (a fixture: the tiny phantom, preprocessed)

HOLDER = """
import sys
from medexgen_lib.locks import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder():
    """``holder(folder)``: another process holding ``folder``'s lock until the test ends."""
    started = []

    def hold(folder):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process
    yield hold
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.reliability
def test_a_second_train_into_a_folder_in_use_is_refused_naming_the_holder(holder, prepared_data, tmp_path,
                                                                         capsys):
    from medexgen_lib.__main__ import main

    out = tmp_path / "out"
    other = holder(out)
    overrides = [arg for key, value in {**TINY, "paths.data_dir": str(prepared_data),
                                        "paths.output_dir": str(out)}.items() for arg in ("-p", key, str(value))]
    assert main(["train", *overrides]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{out} is in use by another MedExGen run: pid {other.pid}" in error[0], error
    assert "paths.output_dir" in error[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written


@pytest.mark.reliability
def test_a_second_run_is_refused_before_any_stage(holder, tmp_path):
    from medexgen_lib.pipeline import run_pipeline

    other = holder(tmp_path / "data")
    with pytest.raises(FolderInUse, match=rf"data is in use .* pid {other.pid} .*paths\.data_dir"):
        run_pipeline("demo", {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out")},
                     start="02", stop="02")
    assert not (tmp_path / "out" / "logs").exists()


@pytest.mark.reliability
def test_the_lock_of_a_killed_run_is_taken_over_and_a_released_one_is_free(holder, tmp_path):
    folder = tmp_path / "out"
    killed = holder(folder)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    with folder_lock(folder), folder_lock(folder):  # taken over; taken again by the same process
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    holder(folder)  # released: another process gets it


NESTED_STAGE = """
import os
from medexgen_lib.config import load_config
from medexgen_lib.locks import folder_lock
cfg = load_config(profile, overrides)
with folder_lock(cfg.paths.output_dir):  # as stage 04's train() does
    open(os.path.join(cfg.paths.output_dir, "stage_ran.txt"), "w").write(str(os.getpid()))
"""


@pytest.mark.reliability
@pytest.mark.notebook
def test_the_runners_own_stage_kernels_share_its_lock(tmp_path):
    from medexgen_lib.pipeline import run_pipeline

    from test_notebooks import _write_stages

    notebooks = _write_stages(tmp_path / "notebooks", {"04_train.ipynb": NESTED_STAGE})
    out = tmp_path / "out"
    results = run_pipeline("demo", {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(out)},
                           notebooks_dir=notebooks)
    assert [r.status for r in results] == ["ok"]
    assert int((out / "stage_ran.txt").read_text()) != os.getpid()  # in the kernel, under the runner's lock
    with folder_lock(out):  # and released when the run ended
        pass


@pytest.mark.reliability
@pytest.mark.parametrize("held, setting", [("data", "paths.data_dir"),
                                           ("out/ablation/side_words_from_the_head/seed_0", "paths.output_dir")])
def test_an_ablation_is_refused_while_another_run_holds_its_folders(held, setting, holder, tmp_path,
                                                                    monkeypatch):
    """Stages 01-03 of an ablation take the locks `run` takes for them (data and output folder)."""
    import medexgen_lib.acquisition as acquisition_module
    from medexgen_lib.ablation import run_ablation

    def acquire(cfg):
        raise AssertionError("stage 01 ran in a folder another run holds")

    monkeypatch.setattr(acquisition_module, "acquire", acquire)
    other = holder(tmp_path / held)
    with pytest.raises(FolderInUse, match=rf"{held} is in use .* pid {other.pid} .*{setting}"):
        run_ablation("demo", {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out")},
                     n_seeds=1, rows=["+ side words from the head"])
