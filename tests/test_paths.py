"""Relative `paths.*` and the default folders: resolved once, against the folder a run starts in,
so that every stage (a notebook kernel runs in notebooks/) writes where the caller meant."""

import json

import pytest

from medexgen_lib.config import ConfigError, load_config
from medexgen_lib.paths import PROJECT_ROOT


@pytest.mark.reliability
def test_relative_folders_are_made_absolute_against_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", {"paths.data_dir": "DATA", "paths.output_dir": "runs/../OUT"})
    assert (cfg.paths.data_dir, cfg.paths.output_dir) == (str(tmp_path / "DATA"), str(tmp_path / "OUT"))
    with pytest.raises(ConfigError, match="paths.output_dir must name a folder"):
        load_config("demo", {"paths.output_dir": " "})


@pytest.mark.reliability
def test_a_tilde_in_a_folder_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", {"paths.data_dir": "~/data", "paths.output_dir": "~/runs/a"})
    assert (cfg.paths.data_dir, cfg.paths.output_dir) == (str(tmp_path / "home" / "data"),
                                                          str(tmp_path / "home" / "runs" / "a"))


@pytest.mark.reliability
def test_default_folders_follow_where_the_run_starts_not_where_the_package_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run started outside the checkout writes there
    assert load_config("demo").paths.output_dir == str(tmp_path / "IUXRAY_OUTPUT_PIPELINE")
    for inside in (PROJECT_ROOT, PROJECT_ROOT / "notebooks"):  # the checkout's folders, as before
        monkeypatch.chdir(inside)
        paths = load_config("demo").paths
        assert (paths.data_dir, paths.output_dir) == (str(PROJECT_ROOT / "IUXRAY_DATA_PIPELINE"),
                                                      str(PROJECT_ROOT / "IUXRAY_OUTPUT_PIPELINE"))


WRITE_STUDIES = """
from medexgen_lib.config import load_config
cfg = load_config(profile, overrides)
cfg.paths.processed.mkdir(parents=True, exist_ok=True)
(cfg.paths.processed / "studies.parquet").write_text("a table")
"""


@pytest.mark.reliability
@pytest.mark.notebook
def test_relative_folders_given_to_the_runner_are_where_every_stage_writes(tmp_path, monkeypatch):
    from medexgen_lib.pipeline import run_pipeline

    from test_notebooks import _write_stages

    notebooks = _write_stages(tmp_path / "notebooks", {"01_write.ipynb": WRITE_STUDIES})
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    results = run_pipeline("demo", {"paths.data_dir": "DATA", "paths.output_dir": "OUT"}, notebooks_dir=notebooks)
    studies = tmp_path / "work" / "DATA" / "processed" / "studies.parquet"
    assert studies.read_text() == "a table"
    assert sorted(p.name for p in notebooks.iterdir()) == ["01_write.ipynb"]  # nothing in the source tree
    assert results[0].outputs == [str(studies)]
    summary = json.loads((tmp_path / "work" / "OUT" / "logs" / "run_summary.json").read_text())
    assert summary["stages"][0]["outputs"] == [str(studies)]
