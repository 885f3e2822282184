"""Image decoding in every mode, the cache, normalisation, the dataset and collate."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medexgen_lib.dataset import IGNORE_INDEX, ReportDataset, collate, pick_views
from medexgen_lib.images import IMAGENET_MEAN, IMAGENET_STD, ImageCache, ImageError, load_image, normalize
from medexgen_lib.tokenizer import train_tokenizer


def _gradient(h=80, w=100):
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


@pytest.mark.reliability
@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "P", "LA", "RGBA", "1", "CMYK-jpeg", "L-jpeg"])
def test_every_mode_loads_as_gray(mode, tmp_path):
    gray = _gradient()
    if mode == "I;16":
        im = Image.fromarray(gray.astype(np.uint16) * 200 + 1000)  # 16-bit, not full range
        path = tmp_path / "x.png"
    elif mode == "CMYK-jpeg":
        im, path = Image.fromarray(gray).convert("CMYK"), tmp_path / "x.jpg"
    elif mode == "L-jpeg":
        im, path = Image.fromarray(gray), tmp_path / "x.jpg"
    else:
        im, path = Image.fromarray(gray).convert(mode), tmp_path / "x.png"
    im.save(path)
    if mode == "I;16":
        assert Image.open(path).mode.startswith("I")
    out = load_image(path, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BILINEAR))
    tolerance = 130 if mode == "1" else 12  # "1" is dithered black/white
    assert np.abs(out.astype(int) - expected).mean() < tolerance
    if mode != "1":
        assert out[0, 0] < out[-1, -1]  # dark top-left, bright bottom-right, no inversion


def test_real_sample_images_load(iuxray_sample):
    for path in sorted((iuxray_sample / "images").glob("*.png")):
        out = load_image(path, 64)
        assert out.shape == (64, 64) and 20 < out.mean() < 235


@pytest.mark.reliability
@pytest.mark.parametrize("content", [b"", b"this is text, not a PNG\n", "truncated", "corrupt"])
def test_unreadable_images_name_the_file(content, tmp_path):
    path = tmp_path / "bad.png"
    Image.fromarray(_gradient()).save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    if content == "truncated":
        content = good[: len(good) // 2]
    elif content == "corrupt":
        content = good[:60] + bytes(200) + good[260:]
    path.write_bytes(content)
    with pytest.raises(ImageError, match="bad.png"):
        load_image(path, 32)


@pytest.mark.reliability
def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 4000)).save(path)  # compresses to a few kB
    with pytest.raises(ImageError, match="bomb.png.*decompression bomb"):
        load_image(path, 32, max_pixels=1_000_000)


def test_normalize_matches_imagenet_statistics():
    pixels = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = normalize(pixels)
    assert out.shape == (1, 3, 1, 2)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-6)
        assert out[0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)


def test_cache_pixels_equal_direct_decoding_and_cache_is_reused(image_files, tmp_path):
    cache = ImageCache.build(image_files, 32, tmp_path / "cache")
    for image_id, path in image_files:
        assert np.array_equal(cache.get(image_id), load_image(path, 32))
    again = ImageCache.build(image_files, 32, tmp_path / "cache")
    assert again.folder == cache.folder
    other_size = ImageCache.build(image_files, 64, tmp_path / "cache")
    assert other_size.folder != cache.folder


@pytest.mark.reliability
def test_cache_stops_or_skips_a_bad_image(image_files, tmp_path):
    bad_path = tmp_path / "broken.png"
    bad_path.write_bytes(b"not a png")
    files = image_files + [("BROKEN", str(bad_path))]
    with pytest.raises(ImageError, match="broken.png"):
        ImageCache.build(files, 32, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written
    cache = ImageCache.build(files, 32, tmp_path / "cache", bad_image="skip")
    assert len(cache) == 5 and "BROKEN" in cache.bad and "BROKEN" not in cache


def test_pick_views(image_files, tmp_path):
    cache = ImageCache.build(image_files, 32, tmp_path / "cache")
    assert pick_views(["IM1", "IM0"], ["lateral", "frontal"], cache, "duplicate") == ("IM0", "IM1")
    assert pick_views(["IM0", "IM1"], ["unknown", "unknown"], cache, "duplicate") == ("IM0", "IM1")
    assert pick_views(["IM2"], ["frontal"], cache, "duplicate") == ("IM2", "IM2")
    assert pick_views(["IM2"], ["lateral"], cache, "blank") == (None, "IM2")
    assert pick_views(["IM2"], ["frontal"], cache, "drop") is None
    assert pick_views(["MISSING"], ["frontal"], cache, "duplicate") is None


def test_dataset_items_and_collate(image_files, tmp_path):
    cache = ImageCache.build(image_files, 32, tmp_path / "cache")
    studies = pd.DataFrame({"uid": ["CXR1", "CXR2", "CXR3"],
                            "image_ids": [["IM0", "IM1"], ["IM2"], ["NOPE"]],
                            "projections": [["frontal", "lateral"], ["lateral"], ["frontal"]]})
    texts = pd.Series(["Heart normal. No effusion.", "Left pleural effusion.", "x"], index=studies.index)
    tok = train_tokenizer(texts.tolist() * 5, 300)
    ds = ReportDataset(studies, texts, cache, tok, max_length=32, missing_view="blank")
    assert len(ds) == 2 and ds.dropped == 1
    item = ds[1]
    assert item["pixels"].shape == (2, 32, 32) and item["pixels"][0].sum() == 0
    assert item["view_mask"].tolist() == [False, True]
    assert torch.equal(ds[0]["pixels"][0], torch.from_numpy(np.array(cache.get("IM0"))))
    batch = collate([ds[0], ds[1]], tok.pad_token_id)
    assert batch["images"].shape == (2, 2, 3, 32, 32) and batch["images"].dtype == torch.float32
    short = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][1, :short], batch["input_ids"][1, :short])
    assert tok.decode(batch["input_ids"][1, 1:short - 1]) == "Left pleural effusion."


def test_augmentation_changes_pixels_but_never_flips(image_files, tmp_path):
    cache = ImageCache.build(image_files, 32, tmp_path / "cache")
    studies = pd.DataFrame({"uid": ["CXR1"], "image_ids": [["IM0", "IM1"]],
                            "projections": [["frontal", "lateral"]]})
    texts = pd.Series(["No effusion."])
    tok = train_tokenizer(["No effusion."] * 5, 300)
    torch.manual_seed(0)
    ds = ReportDataset(studies, texts, cache, tok, 16, augment=True)
    plain = ds.pixels(0).float()
    augmented = ds[0]["pixels"].float()
    assert not torch.equal(plain, augmented)
    same = (augmented - plain).abs().mean()
    flipped = (augmented - plain.flip(-1)).abs().mean()
    assert same < flipped


def test_batched_augmentation_is_the_identity_at_zero_strength_and_keeps_blank_views_blank(monkeypatch):
    import medexgen_lib.dataset as dataset

    views = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    views[2] = 0  # a blank view
    out = dataset.augment_views(views, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == views.shape and not torch.equal(out[:2], views[:2])
    assert out[2].sum() == 0
    for name, value in (("DEGREES", 0.0), ("TRANSLATE", 0.0), ("SCALE", (1.0, 1.0)), ("BRIGHTNESS", 0.0),
                        ("CONTRAST", 0.0)):
        monkeypatch.setattr(dataset, name, value)
    assert torch.equal(dataset.augment_views(views), views)


BUILD_CACHE = """
import sys
from medexgen_lib.images import ImageCache
images = [(f"IM{k}", path) for k, path in enumerate(sys.argv[2:])]
try:
    ImageCache.build(images, 128, sys.argv[1])
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.reliability
def test_a_full_disk_while_caching_images_is_named_and_leaves_nothing(image_files, tmp_path, full_disk):
    import subprocess
    import sys
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", BUILD_CACHE, str(cache), *[p for _, p in image_files]],
                         capture_output=True, text=True, preexec_fn=full_disk(50_000))
    assert run.returncode == 3, run.stderr  # 5 images at 128 px need 82 kB
    assert "cannot reserve 0.1 MB for the image cache" in run.stderr and str(cache) in run.stderr
    assert list(cache.iterdir()) == []


@pytest.mark.reliability
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_an_image_deleted_after_the_table_was_built(policy, image_files, tmp_path):
    (tmp_path / "img3.png").unlink()
    if policy == "stop":
        with pytest.raises(ImageError, match="img3.png"):
            ImageCache.build(image_files, 32, tmp_path / "cache")
    else:
        cache = ImageCache.build(image_files, 32, tmp_path / "cache", bad_image="skip")
        assert len(cache) == 4 and "IM3" in cache.bad and "No such file" in cache.bad["IM3"]


@pytest.mark.reliability
def test_a_filesystem_without_fallocate_still_gets_a_cache(image_files, tmp_path, monkeypatch):
    import errno
    import os

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    cache = ImageCache.build(image_files, 32, tmp_path / "cache")
    assert len(cache) == 5 and np.array_equal(cache.get("IM0"), load_image(image_files[0][1], 32))


@pytest.mark.reliability
def test_exif_orientation_is_applied_before_anything_else(tmp_path):
    stored = np.zeros((100, 200), np.uint8)
    stored[:, :100] = 255  # wide as stored, left half bright
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: displayed turned 90° clockwise, so the left half is on top
    Image.fromarray(stored).save(tmp_path / "x.jpg", exif=exif)
    out = load_image(tmp_path / "x.jpg", 64).astype(int)
    assert out[:28].mean() > 200 and out[36:].mean() < 50


@pytest.mark.reliability
@pytest.mark.parametrize("real, name, promised", [("TIFF", "x.png", "PNG"), ("BMP", "x.png", "PNG"),
                                                  ("EPS", "x.jpg", "JPEG"), ("JPEG", "x.png", "PNG")])
def test_only_the_format_the_suffix_promises_is_decoded(real, name, promised, tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript",
                        lambda *a, **k: pytest.fail("an EPS file reached Ghostscript"))
    Image.fromarray(_gradient(64, 64)).save(tmp_path / name, format=real)
    with pytest.raises(ImageError, match=f"{name}: not a {promised} file, as its suffix promises"):
        load_image(tmp_path / name, 32)
    (tmp_path / "x.tif").write_bytes((tmp_path / name).read_bytes())
    with pytest.raises(ImageError, match="suffix '.tif' is not read here"):
        load_image(tmp_path / "x.tif", 32)


@pytest.mark.reliability
def test_a_cache_built_before_exif_orientation_was_applied_is_not_reused(tmp_path):
    """The key did not change with the decoding: a cache of 03_preprocessing built by the old
    code (JPEGs unrotated) was silently reused after the fix."""
    import hashlib
    import json

    stored = np.zeros((100, 200), np.uint8)
    stored[:, :100] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "x.jpg", exif=exif)
    images = [("x", str(tmp_path / "x.jpg"))]
    digest = hashlib.sha256(json.dumps({"size": 32, "version": 1}).encode())  # the old key
    digest.update(f"x\0{images[0][1]}\0{(tmp_path / 'x.jpg').stat().st_size}\n".encode())
    old = tmp_path / "cache" / f"32px-{digest.hexdigest()[:16]}"
    old.mkdir(parents=True)
    unrotated = np.asarray(Image.fromarray(stored).resize((32, 32)))
    unrotated.tofile(old / "pixels.u8")  # the cache layout of that version: one memmap
    (old / ImageCache.INDEX).write_text(json.dumps({"size": 32, "image_ids": ["x"], "bad": {}}))
    cache = ImageCache.build(images, 32, tmp_path / "cache")
    assert cache.folder != old
    assert np.array_equal(cache.get("x"), load_image(tmp_path / "x.jpg", 32))
