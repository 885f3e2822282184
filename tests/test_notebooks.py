"""The numbered notebooks executed headless with papermill on a phantom set."""

import json

import pytest

from medexgen_lib.pipeline import StageFailed, run_pipeline

pytestmark = pytest.mark.notebook


def test_stages_run_headless(tmp_path):
    overrides = {"paths.data_dir": str(tmp_path / "data"),
                 "paths.output_dir": str(tmp_path / "out"),
                 "data.n_phantom_studies": 30, "data.phantom_image_size": 64}
    results = run_pipeline("demo", overrides, start="01", stop="03")
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    assert (tmp_path / "data" / "processed" / "studies.parquet").exists()
    stats = json.loads((tmp_path / "out" / "logs" / "eda_stats.json").read_text())
    assert stats["reports"] == 30
    assert (tmp_path / "out" / "plots" / "eda_report_lengths.png").exists()
    executed = json.loads((tmp_path / "out" / "logs" / "notebooks" / "01_acquisition.ipynb").read_text())
    outputs = "".join(str(o) for c in executed["cells"] for o in c.get("outputs", []))
    assert "generated phantom set: 30 studies" in outputs
    summary = json.loads((tmp_path / "out" / "logs" / "run_summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["01", "02", "03"]
    processed = tmp_path / "data" / "processed"
    splits = json.loads((processed / "splits.json").read_text())
    assert sum(len(splits[n]) for n in ("train", "val", "test")) == 30
    assert (processed / "tokenizer" / "source.json").exists()
    assert (tmp_path / "out" / "plots" / "preprocessing_images.png").exists()


def test_stage_without_its_input_names_notebook_and_what_to_run(tmp_path):
    overrides = {"paths.data_dir": str(tmp_path / "empty"), "paths.output_dir": str(tmp_path / "out")}
    with pytest.raises(StageFailed) as info:
        run_pipeline("demo", overrides, start="02", stop="02")
    message = str(info.value)
    assert "02_eda.ipynb" in message and "run notebook 01_acquisition first" in message
    assert "--from 02" in message
