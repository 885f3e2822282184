"""Two CPU processes under ``accelerate launch`` (gloo): same weights, only rank 0 writes, each
reads only its own studies' rows of the sharded image cache; a run with nothing to export stops
on every process instead of leaving one waiting."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import medexgen_lib.images as images_module
from medexgen_lib.acquisition import acquire, build_studies_table
from medexgen_lib.config import load_config
from medexgen_lib.phantom_layouts import write_phantom
from medexgen_lib.preprocess import run_preprocessing


WORKER = Path(__file__).with_name("multiprocess_worker.py")
# --multi_gpu selects the torchrun launcher; without CUDA, Accelerate runs MULTI_CPU on gloo.
LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The MIMIC-layout phantom (22 studies: 16 train, 43 images of 1-3 views), read with its split."""
    data = write_phantom(tmp_path_factory.mktemp("layouts") / "mimic", "mimic", 22, 48, 0)
    cfg = load_config("demo", {"data.source": "mimic", "paths.data_dir": str(data),
                               "paths.output_dir": str(tmp_path_factory.mktemp("unused")),
                               "images.size": 32, "tokenizer.vocab_size": 400, "text.max_length": 48})
    build_studies_table(cfg, acquire(cfg))
    with pytest.MonkeyPatch.context() as patch:  # 8 images per shard: the cache in 6 shards
        patch.setattr(images_module, "SHARD_BYTES", 8 * 32 * 32)
        run_preprocessing(cfg)
    return data


def _launch(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """The worker on two processes; a hang is killed (the whole process group) and fails the test."""
    process = subprocess.Popen([*LAUNCHER, str(WORKER), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the 2-process run hung for {timeout} s: {stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_two_processes_keep_identical_weights_and_only_rank0_writes(data, tmp_path):
    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    run = _launch(str(data), str(out), str(record), timeout=600)
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

    # Each rank read its own studies (disjoint, together the whole training split, every epoch)
    # and, of the shards, only the rows of those studies' images.
    reads = [json.loads((record / f"reads_rank{r}.json").read_text()) for r in (0, 1)]
    train_uids = set(json.loads((data / "processed" / "splits.json").read_text())["train"])
    assert reads[0]["shards"] == 6 and len(train_uids) % 8 == 0  # 2 ranks x batch 4: no padding
    for epoch in ("1", "2"):
        studies = [reads[r]["studies"][epoch] for r in (0, 1)]
        assert not set(studies[0]) & set(studies[1])
        assert set(studies[0]) | set(studies[1]) == train_uids
        for r in (0, 1):
            views = {i for uid in studies[r] for i in reads[r]["views"][uid] if i is not None}
            assert set(reads[r]["images"][epoch]) == views
    for r in (0, 1):
        read = {i for epoch in ("1", "2") for i in reads[r]["images"][epoch]}
        assert reads[r]["opened_shards"] == sorted({reads[r]["location"][i][0] for i in read})


def test_nothing_to_export_is_raised_on_every_process_none_hangs(data, tmp_path):
    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    run = _launch(str(data), str(out), str(record), "never-best", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        raised = record / f"raised_rank{rank}.txt"
        assert raised.exists(), f"rank {rank} did not raise: {run.stderr[-2000:]}"
        assert "nothing to export" in raised.read_text()
    assert not (out / "models" / "final").exists()


@pytest.mark.reliability
def test_an_output_folder_in_use_stops_every_process_none_hangs(data, tmp_path):
    from test_output_lock import HOLDER

    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = _launch(str(data), str(out), str(record), "in-use", timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        raised = record / f"raised_rank{rank}.txt"
        assert raised.exists(), f"rank {rank} did not raise: {run.stderr[-2000:]}"
        assert f"in use by another MedExGen run: pid {holder.pid}" in raised.read_text()
    assert not (out / "logs").exists()
