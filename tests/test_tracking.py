"""Live curves: a tiny run's TensorBoard event files, read back with TensorBoard's own reader."""

import importlib.util
import json
import math

import pytest

from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import ConfigError, load_config
from medexgen_lib.preprocess import load_split, run_preprocessing
from medexgen_lib.tracking import flatten, resolve_log_with, tracker_dir
from medexgen_lib.train import train

from conftest import TINY


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    settings = {**TINY, "paths.data_dir": str(data_dir)}
    cfg = load_config("demo", {**settings, "paths.output_dir": str(tmp_path_factory.mktemp("unused"))})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    return settings


def _read_run(cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in tracker_dir(cfg).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    events = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return runs[0], events


def test_a_tiny_run_writes_curves_tensorboard_reads_back(tiny_settings, tmp_path):
    cfg = load_config("demo", {**tiny_settings, "paths.output_dir": str(tmp_path / "out")})
    result = train(cfg, progress=False)
    history = [json.loads(line) for line in result.history.read_text().splitlines()]
    run, events = _read_run(cfg)
    scalars = events.Tags()["scalars"]

    steps = history[-1]["step"]
    # Counted here, not taken from training's own counter: an off-by-one there shows too.
    batches = math.ceil(len(load_split(cfg, "train")) / cfg.train.batch_size)
    assert steps == cfg.train.epochs * math.ceil(batches / cfg.train.grad_accum)
    assert [h["step"] for h in history] == [e * steps // cfg.train.epochs for e in range(1, cfg.train.epochs + 1)]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    for group in history[0]["learning_rates"]:
        assert len(events.Scalars(f"lr/{group}")) == steps
    val_steps = [h["step"] for h in history]
    assert [e.step for e in events.Scalars("val/loss")] == val_steps
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([h["val_loss"] for h in history])
    for metric in history[0]["val"]:
        assert [e.value for e in events.Scalars(f"val/{metric}")] == pytest.approx(
            [h["val"][metric] for h in history]), metric
    assert any(tag.startswith("val_per_observation/") for tag in scalars)
    # Text (generated reports, fingerprint) is stored as tensors by the TensorBoard writer.
    texts = events.Tags()["tensors"]
    assert "val/generated_reports/text_summary" in texts
    fingerprints = events.Tensors("run/evaluation_fingerprint/text_summary")
    assert len(fingerprints) == len(history)
    assert history[0]["fingerprint"] in fingerprints[0].tensor_proto.string_val[0].decode()
    # The config as hyperparameters, with the fingerprint.
    hparams = next(run.glob("*/hparams.yml")).read_text()
    assert f"evaluation_fingerprint: {history[0]['fingerprint']}" in hparams
    assert "train.lr_new: " in hparams


def test_log_with_none_writes_no_event_files(tiny_settings, tmp_path):
    cfg = load_config("demo", {**tiny_settings, "paths.output_dir": str(tmp_path / "out"),
                               "train.epochs": 1, "train.log_with": "none"})
    train(cfg, progress=False)
    assert not tracker_dir(cfg).exists()


def test_unknown_or_missing_tracker_is_named():
    with pytest.raises(ConfigError, match="'tensorbored'"):
        resolve_log_with("tensorbored")
    assert resolve_log_with("none") is None
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="'wandb': its package is not installed"):
            resolve_log_with("wandb")
    assert resolve_log_with("tensorboard") == "tensorboard"


def test_config_flattens_to_scalar_hyperparameters():
    flat = flatten(load_config("demo").to_dict())
    assert flat["train.lr_new"] == 1e-3 and flat["model.encoder"] == "resnet18"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_pipeline_refuses_an_unknown_tracker_before_any_stage_runs(tmp_path):
    """A typo in train.log_with is found before stage 01 downloads and 03 preprocesses."""
    import nbformat

    from medexgen_lib.pipeline import run_pipeline

    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("01_acquisition.ipynb", "04_training.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), folder / name)
    overrides = {"paths.data_dir": str(tmp_path / "data"), "paths.output_dir": str(tmp_path / "out"),
                 "train.log_with": "tensorbored"}
    with pytest.raises(ConfigError, match="'tensorbored'"):
        run_pipeline("demo", overrides, notebooks_dir=folder)
    assert not list((tmp_path / "out").rglob("*.ipynb"))
