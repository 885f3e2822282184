"""`python -m medexgen_lib run --profile demo -p data.source mimic|annotation ...` runs all six
notebooks on a MIMIC-layout phantom, an R2Gen-format phantom and the IU sample in R2Gen's format,
with the split each data set carries (about a minute each: slow)."""

import json
from pathlib import Path

import pytest

from medexgen_lib.__main__ import main
from medexgen_lib.phantom_layouts import write_phantom

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

IU_R2GEN = Path(__file__).parent / "data" / "iuxray-sample-r2gen"
SHORT = {"train.epochs": "2", "train.encoder_epochs": "1"}  # the demo, shortened to what is checked here


def _run(tmp_path, settings: dict[str, str]):
    args = ["run", "--profile", "demo"]
    for key, value in {**settings, **SHORT, "paths.output_dir": str(tmp_path / "out")}.items():
        args += ["-p", key, value]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "logs" / "run_summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok"] * 6
    return json.loads((tmp_path / "out" / "logs" / "metrics_test.json").read_text())


def _splits(data_dir: Path) -> dict:
    return json.loads((data_dir / "processed" / "splits.json").read_text())


def test_the_demo_runs_on_a_mimic_layout_phantom(tmp_path):
    data = write_phantom(tmp_path / "mimic", "mimic", 160, 64, 0)
    metrics = _run(tmp_path, {"data.source": "mimic", "paths.data_dir": str(data)})
    splits = _splits(data)
    source = json.loads((data / "processed" / "source_split.json").read_text())
    assert splits["meta"]["source"] == "source:mimic"
    assert splits["test"] == sorted(item["id"] for item in source["test"]) and metrics["n"] == len(splits["test"])


@pytest.mark.parametrize("dataset", ["phantom", "iu-sample"])
def test_the_demo_runs_on_r2gen_annotations(dataset, tmp_path):
    if dataset == "phantom":
        data = write_phantom(tmp_path / "r2gen", "annotation", 160, 64, 0)
        settings = {"paths.data_dir": str(data)}
        annotation_file = data / "annotation.json"
    else:  # the committed sample stays untouched: stage outputs go to a temporary data folder
        data = tmp_path / "data"
        annotation_file = IU_R2GEN / "annotation.json"
        settings = {"paths.data_dir": str(data), "data.annotation_file": str(annotation_file),
                    "data.image_root": str(IU_R2GEN / "images")}
    metrics = _run(tmp_path, {"data.source": "annotation", **settings})
    annotation = json.loads(annotation_file.read_text())
    splits = _splits(data)
    for name in ("train", "val", "test"):
        assert splits[name] == sorted(item["id"] for item in annotation[name])
    assert metrics["n"] == len(annotation["test"])
