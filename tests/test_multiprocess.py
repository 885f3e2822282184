"""Two CPU processes under ``accelerate launch`` (gloo): same weights, only rank 0 writes."""

import json
import subprocess
import sys
from pathlib import Path

from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import load_config
from medexgen_lib.preprocess import run_preprocessing

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def test_two_processes_keep_identical_weights_and_only_rank0_writes(tmp_path):
    data, out, record = tmp_path / "data", tmp_path / "out", tmp_path / "record"
    record.mkdir()
    cfg = load_config("demo", {"paths.data_dir": str(data), "paths.output_dir": str(out),
                               "data.n_phantom_studies": 24, "data.phantom_image_size": 48,
                               "images.size": 32, "tokenizer.vocab_size": 400, "text.max_length": 48})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    # --multi_gpu selects the torchrun launcher; without CUDA, Accelerate runs MULTI_CPU on gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run = subprocess.run([*launcher, str(WORKER), str(data), str(out), str(record)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    digests = [[json.loads(l) for l in (record / f"digest_rank{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)]
    assert len(digests[0]) >= 2 and digests[0] == digests[1]  # every save: the same weights on both

    writes = [json.loads((record / f"writes_rank{r}.json").read_text()) for r in (0, 1)]
    assert any("history.jsonl" in w for w in writes[0])
    assert any("model files" in w for w in writes[0])
    assert writes[1] and all(Path(w).name == "rng_1.json" for w in writes[1]), writes[1]
    history = (out / "logs" / "history.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in history] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints" / "last").glob("rng_*.json")) == ["rng_0.json", "rng_1.json"]
