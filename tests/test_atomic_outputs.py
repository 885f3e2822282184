"""Outputs written by the tokenizer, the benchmark and `score --out` are replaced whole or not at
all: a write that fails (a disk filling up, an error mid-save) leaves the previous file or folder."""

import json
import subprocess
import sys

import pytest
from transformers import PreTrainedTokenizerFast

from medexgen_lib.tokenizer import build_tokenizer, load_tokenizer

TEXTS = ["Heart size normal. No pleural effusion.", "Small left pleural effusion."] * 20


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.reliability
def test_a_failed_tokenizer_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "processed" / "tokenizer"
    build_tokenizer("trained", TEXTS, out, vocab_size=300)
    before = _contents(out)

    def fails_half_way(self, directory, **kwargs):
        (directory / "tokenizer.json").write_text('{"trunc')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fails_half_way)
    with pytest.raises(OSError, match="No space left"):
        build_tokenizer("trained", TEXTS, out, vocab_size=300)
    assert _contents(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["tokenizer"]  # no staging folder left
    assert load_tokenizer(out).encode("pleural effusion")


BENCH_WITHOUT_MEASURING = """
import sys
from pathlib import Path
import medexgen_lib.bench as bench
for name in ("bench_images", "bench_generation", "bench_training", "bench_accelerated_training"):
    setattr(bench, name, lambda *a, **k: {"512": {"speedup": 1}, "2048": {"speedup": 1},
                                          "speedup": 1, "bf16_speedup_over_fp32": 1, "x": "y" * 500})
bench.format_report = lambda report: ""
bench.run(True, "quick", Path(sys.argv[1]))
"""


@pytest.mark.reliability
@pytest.mark.parametrize("writer", ["score --out", "bench"])
def test_a_disk_filling_up_keeps_the_previous_output_file(writer, tmp_path, full_disk):
    if writer == "bench":
        out = tmp_path / "quick.json"
        command = [sys.executable, "-c", BENCH_WITHOUT_MEASURING, str(tmp_path)]
    else:
        (tmp_path / "preds.csv").write_text("uid,prediction,reference\n"
                                            "CXR1,No pleural effusion.,No pleural effusion.\n"
                                            "CXR2,Small effusion.,Cardiomegaly.\n")
        out = tmp_path / "metrics.json"
        command = [sys.executable, "-m", "medexgen_lib", "score", str(tmp_path / "preds.csv"),
                   "--out", str(out)]
    out.write_text('{"previous": "run"}')
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         preexec_fn=full_disk(200))
    assert run.returncode != 0 and "File too large" in run.stderr
    assert json.loads(out.read_text()) == {"previous": "run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["preds.csv", "metrics.json"] if writer != "bench" else ["quick.json"])
    # Writing when there is room is covered by test_evaluation and test_bench.


@pytest.mark.reliability
def test_read_json_names_a_file_nested_too_deep(tmp_path):
    from medexgen_lib.files import read_json

    (tmp_path / "splits.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="splits.json is damaged, not valid JSON"):
        read_json(tmp_path / "splits.json")
