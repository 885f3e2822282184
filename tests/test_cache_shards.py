"""The image cache in shards: bounded shard files, lazy memory maps, a build that resumes after
an interruption or a kill, damaged shards named, and caches that pickle without their pixels."""

import json
import pickle
import subprocess
import sys
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import medexgen_lib.images as images_module
from medexgen_lib.dataset import ReportDataset, collate
from medexgen_lib.images import CacheError, ImageCache, load_image
from medexgen_lib.tokenizer import train_tokenizer

SIZE = 32
PER_SHARD = 2  # images per shard in these tests


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(images_module, "SHARD_BYTES", PER_SHARD * SIZE * SIZE)


def _interrupt_at(monkeypatch, stop_path):
    """Ctrl-C while decoding ``stop_path``; returns the real decoder to put back."""
    decode = images_module.load_image

    def interrupted(path, *args, **kwargs):
        if path == stop_path:
            raise KeyboardInterrupt
        return decode(path, *args, **kwargs)
    monkeypatch.setattr(images_module, "load_image", interrupted)
    return decode


def _contents(folder):
    """Every file of a cache folder by name, as bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_cache_is_written_in_bounded_npy_shards_read_lazily(image_files, tmp_path, small_shards):
    cache = ImageCache.build(image_files, SIZE, tmp_path / "cache")
    shards = sorted(cache.folder.glob("shard_*.npy"))
    assert [len(np.load(p, mmap_mode="r")) for p in shards] == [2, 2, 1]
    for path in shards:
        assert np.load(path, mmap_mode="r").nbytes <= images_module.SHARD_BYTES
    index = json.loads((cache.folder / ImageCache.INDEX).read_text())
    assert [s["image_ids"] for s in index["shards"]] == [["IM0", "IM1"], ["IM2", "IM3"], ["IM4"]]
    reopened = ImageCache(cache.folder)
    assert reopened.opened_shards() == []
    assert np.array_equal(reopened.get("IM3"), load_image(image_files[3][1], SIZE))
    assert reopened.opened_shards() == [1]  # only the shard holding IM3 was mapped
    assert isinstance(reopened.shard(1), np.memmap) and not reopened.shard(1).flags.writeable
    for image_id, path in image_files:
        assert np.array_equal(reopened.get(image_id), load_image(path, SIZE))


def test_a_shard_holds_as_many_images_as_fit_in_64_mib():
    assert images_module.SHARD_BYTES == 64 * 2**20
    assert images_module.shard_rows(64) == 16384 and images_module.shard_rows(224) == 1337
    assert images_module.shard_rows(16384) == 1  # never an empty shard


# Builds the cache in a child process that kills itself (SIGKILL: no cleanup runs) while
# decoding the 5th image, i.e. in the middle of the third shard.
KILLED_BUILD = """
import os, signal, sys
import medexgen_lib.images as images
images.SHARD_BYTES = int(sys.argv[2])
decode, calls = images.load_image, []
def load_image(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return decode(*args, **kwargs)
images.load_image = load_image
files = [(f"IM{k}", path) for k, path in enumerate(sys.argv[3:])]
images.ImageCache.build(files, 32, sys.argv[1])
"""


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_cache_build_resumes_after_its_finished_shards(how, image_files, tmp_path,
                                                                       small_shards, monkeypatch):
    root = tmp_path / "cache"
    if how == "kill":
        run = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(root),
                              str(images_module.SHARD_BYTES), *[p for _, p in image_files]],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == -9, run.stderr
    else:
        decode = _interrupt_at(monkeypatch, image_files[4][1])
        with pytest.raises(KeyboardInterrupt):
            ImageCache.build(image_files, SIZE, root)
        monkeypatch.setattr(images_module, "load_image", decode)
    (building,) = root.iterdir()
    assert building.name.endswith(".building")
    finished = {p.name: p.stat() for p in building.glob("shard_*.npy")}
    assert sorted(finished) == ["shard_00000.npy", "shard_00001.npy"]

    decoded = []
    decode = images_module.load_image
    monkeypatch.setattr(images_module, "load_image",
                        lambda path, *a, **k: decoded.append(path) or decode(path, *a, **k))
    cache = ImageCache.build(image_files, SIZE, root)
    assert decoded == [image_files[4][1]]  # only the rest was decoded
    for name, before in finished.items():  # the finished shards were not rewritten
        after = (cache.folder / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in root.iterdir()] == [cache.folder.name]

    uninterrupted = ImageCache.build(image_files, SIZE, tmp_path / "uninterrupted")
    assert _contents(cache.folder) == _contents(uninterrupted.folder)


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["truncated", "empty", "not npy", "missing", "other shape"])
def test_a_damaged_shard_is_one_error_naming_the_file(damage, image_files, tmp_path, small_shards):
    cache = ImageCache.build(image_files, SIZE, tmp_path / "cache")
    shard = cache.folder / "shard_00001.npy"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "not npy":
        shard.write_bytes(b"this is not a numpy file" * 100)
    elif damage == "missing":
        shard.unlink()
    else:
        np.save(shard, np.zeros((3, SIZE, SIZE), np.uint8))
    reopened = ImageCache(cache.folder)
    assert np.array_equal(reopened.get("IM0"), load_image(image_files[0][1], SIZE))  # shard 0 is fine
    with pytest.raises(CacheError, match="shard_00001.npy") as raised:
        reopened.get("IM2")
    assert len(str(raised.value).splitlines()) == 1 and "re-run notebook 03_preprocessing" in str(raised.value)
    with pytest.raises(CacheError, match="shard_00001.npy"):  # stage 03 names it before reusing the cache
        ImageCache.build(image_files, SIZE, tmp_path / "cache")


@pytest.mark.reliability
def test_a_damaged_finished_shard_is_rebuilt_when_the_build_resumes(image_files, tmp_path, small_shards,
                                                                     monkeypatch):
    decode = _interrupt_at(monkeypatch, image_files[4][1])
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(image_files, SIZE, tmp_path / "cache")
    monkeypatch.setattr(images_module, "load_image", decode)
    (building,) = (tmp_path / "cache").iterdir()
    damaged = building / "shard_00001.npy"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    cache = ImageCache.build(image_files, SIZE, tmp_path / "cache")
    for image_id, path in image_files:
        assert np.array_equal(cache.get(image_id), load_image(path, SIZE))


@pytest.mark.reliability
def test_a_cache_of_the_older_single_file_layout_is_named(tmp_path):
    old = tmp_path / "64px-0123456789abcdef"
    old.mkdir()
    (old / "pixels.u8").write_bytes(bytes(64 * 64))
    (old / ImageCache.INDEX).write_text(json.dumps({"size": 64, "image_ids": ["x"], "bad": {}}))
    with pytest.raises(CacheError, match=f"{old / ImageCache.INDEX} is an image cache in an older format"):
        ImageCache(old)


def test_the_cache_pickles_without_pixels_and_each_loader_worker_maps_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "SHARD_BYTES", 3 * 64 * 64)
    rng = np.random.default_rng(1)
    files = []
    for k in range(12):
        path = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
        files.append((f"IM{k:02d}", str(path)))
    cache = ImageCache.build(files, 64, tmp_path / "cache")
    studies = pd.DataFrame({"uid": [f"CXR{k}" for k in range(6)],
                            "image_ids": [[files[2 * k][0], files[2 * k + 1][0]] for k in range(6)],
                            "projections": [["frontal", "lateral"]] * 6})
    texts = pd.Series(["No effusion."] * 6, index=studies.index)
    tokenizer = train_tokenizer(texts.tolist() * 5, 300)
    dataset = ReportDataset(studies, texts, cache, tokenizer, 16)
    dataset[0]  # maps shard 0 in this process
    assert cache.opened_shards() == [0]
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(cache)) < 12 * 64 * 64 // 4  # ids and locations, not the 48 kB of pixels
    assert copy.cache.opened_shards() == []
    assert torch.equal(copy[0]["pixels"], dataset[0]["pixels"])

    def batches(workers):
        loader = DataLoader(dataset, batch_size=2, num_workers=workers, multiprocessing_context="spawn"
                            if workers else None,
                            collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
        return [(b["uids"], b["images"]) for b in loader]
    serial, parallel = batches(0), batches(2)
    assert [u for u, _ in serial] == [u for u, _ in parallel]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(serial, parallel))


@pytest.mark.reliability
def test_a_build_resumed_under_stop_refuses_an_image_an_interrupted_skip_build_left_out(
        image_files, tmp_path, small_shards, monkeypatch):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    files = sorted(image_files + [("IM1b", str(broken))])  # in the first shard
    decode = _interrupt_at(monkeypatch, image_files[4][1])
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(files, SIZE, tmp_path / "cache", bad_image="skip")
    monkeypatch.setattr(images_module, "load_image", decode)
    with pytest.raises(images_module.ImageError, match="broken.png"):
        ImageCache.build(files, SIZE, tmp_path / "cache", bad_image="stop")
    assert list((tmp_path / "cache").iterdir()) == []  # as any build stopped by a bad image
    cache = ImageCache.build(files, SIZE, tmp_path / "cache", bad_image="skip")
    assert "IM1b" in cache.bad and len(cache) == 5


@pytest.mark.reliability
def test_a_shard_of_only_bad_images_is_remembered_when_an_interrupted_build_resumes(
        image_files, tmp_path, small_shards, monkeypatch):
    for _, path in image_files[:2]:  # IM0 and IM1: the whole first shard unreadable
        with open(path, "wb") as handle:
            handle.write(b"not a png")
    decode = _interrupt_at(monkeypatch, image_files[4][1])
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(image_files, SIZE, tmp_path / "cache", bad_image="skip")
    monkeypatch.setattr(images_module, "load_image", decode)
    with pytest.raises(images_module.ImageError, match="img0.png"):
        ImageCache.build(image_files, SIZE, tmp_path / "cache", bad_image="stop")
    with pytest.raises(KeyboardInterrupt):  # interrupted again, then resumed as it began
        _interrupt_at(monkeypatch, image_files[4][1])
        ImageCache.build(image_files, SIZE, tmp_path / "cache", bad_image="skip")
    monkeypatch.setattr(images_module, "load_image", decode)
    cache = ImageCache.build(image_files, SIZE, tmp_path / "cache", bad_image="skip")
    assert sorted(cache.bad) == ["IM0", "IM1"] and len(cache) == 3
    assert json.loads((cache.folder / "index.json").read_text())["bad"].keys() == {"IM0", "IM1"}
