"""Radiographs -> model input: robust decoding, a one-time uint8 cache, normalisation.

Every image is decoded and resized once into a numpy memmap (nanoGPT style)
keyed by the settings; training reads rows of it and never decodes a PNG.
Normalisation to ImageNet statistics is done per batch, vectorised, in torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from tqdm.auto import tqdm

from medexgen_lib.files import read_json

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


MIN_SIDE, MAX_ASPECT = 32, 4.0  # anything smaller or more elongated is not a radiograph
# The only decoders Pillow may use for each suffix: a TIFF, BMP or EPS named .png is refused,
# never handed to another plugin (EPS would go to Ghostscript). DICOM has its own reader.
FORMATS_BY_SUFFIX = {".png": ("PNG",), ".jpg": ("JPEG",), ".jpeg": ("JPEG",)}
# Part of the image cache's key: raised whenever load_image decodes the same file differently,
# so a cache built by older code is not reused. 2: EXIF orientation applied, formats by suffix.
CACHE_VERSION = 2


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


def check_radiograph_shape(path, width: int, height: int) -> None:
    """Refuse images too small or too elongated to be a chest radiograph, naming the file."""
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"image {path} is {width}x{height} pixels: not radiograph-shaped "
                         f"(each side at least {MIN_SIDE} px, sides within {MAX_ASPECT:g}:1)")


def image_formats(path: str | os.PathLike) -> tuple[str, ...]:
    """The Pillow formats a file's suffix promises; ``ImageError`` for any other suffix."""
    formats = FORMATS_BY_SUFFIX.get(Path(path).suffix.lower())
    if formats is None:
        raise ImageError(f"image {path}: suffix {Path(path).suffix!r} is not read here "
                         "(PNG as .png, JPEG as .jpg/.jpeg, or DICOM)")
    return formats


def load_image(path: str | os.PathLike, size: int, max_pixels: int = 60_000_000) -> np.ndarray:
    """Decode any mode the data has (8/16-bit gray, RGB, palette, CMYK) to ``size``² uint8 gray.

    Only the format the suffix promises is decoded (``image_formats``). Images over
    ``max_pixels`` are refused before decoding (decompression bombs). EXIF orientation
    is applied before any pixel is used, so the model sees the image as displayed.
    The image is resized to a square without cropping, so no finding at the edge is lost.
    """
    formats = image_formats(path)
    try:
        with Image.open(path, formats=formats) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"image {path} is {width}x{height} pixels, over images.max_pixels "
                                 f"({max_pixels}); refused as a possible decompression bomb")
            check_radiograph_shape(path, width, height)
            if im.format in ("JPEG", "MPO"):
                im.draft("L", (size, size))  # let libjpeg decode at reduced scale
            gray = _to_gray(ImageOps.exif_transpose(im))
            return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
    except ImageError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"cannot read image {path}: not a {formats[0]} file, as its suffix "
                         f"promises ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {path} refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None


def stretch_to_uint8(values: np.ndarray) -> Image.Image:
    """Deep (16-bit, float) gray values min-max stretched to an 8-bit image."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(scaled.round().astype(np.uint8))


def _to_gray(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT_MODES:
        return stretch_to_uint8(np.asarray(im))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "CMYK":
        im = im.convert("RGB")
    return im.convert("L")


# (x / 255 - mean) / std  ==  x * scale + offset, per channel
_SCALE = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_OFFSET = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W]`` -> float ``[..., 3, H, W]`` with ImageNet mean/std: one multiply
    and one in-place add over the batch (about 40x faster here than subtract-then-divide)."""
    scale, offset = _SCALE.to(pixels.device), _OFFSET.to(pixels.device)
    return pixels.unsqueeze(-3).to(torch.float32).mul(scale).add_(offset)


def train_augmentation() -> v2.Transform:
    """Small rotation/shift/zoom and contrast jitter. No horizontal flip: reports say left/right."""
    return v2.Compose([
        v2.RandomAffine(degrees=5, translate=(0.03, 0.03), scale=(0.95, 1.05)),
        v2.ColorJitter(brightness=0.1, contrast=0.1),
    ])


def _reserved_memmap(path: Path, shape: tuple[int, ...], cache: Path) -> np.memmap:
    """A writable uint8 memmap whose disk blocks are reserved up front: on a full disk
    this raises ``OSError`` naming the cache, where writing into a sparse memmap would
    kill the process with SIGBUS half way through."""
    nbytes = int(np.prod(shape))
    try:
        with open(path, "wb") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, nbytes)
            except (AttributeError, OSError) as exc:  # no such call, or a filesystem without it
                if getattr(exc, "errno", None) not in (None, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                handle.truncate(nbytes)
    except OSError as exc:
        raise OSError(f"cannot reserve {nbytes / 1e6:.1f} MB for the image cache {cache}: "
                      f"{exc.strerror or exc}") from None
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)


class ImageCache:
    """Resized uint8 pixels of many images in one memmap, addressed by image id."""

    PIXELS, INDEX = "pixels.u8", "index.json"

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if not (folder / self.INDEX).exists():
            raise FileNotFoundError(f"no image cache in {folder}; run notebook 03_preprocessing first")
        self.folder = folder
        self.index = read_json(folder / self.INDEX)
        self.size = self.index["size"]
        self.row_of = {image_id: i for i, image_id in enumerate(self.index["image_ids"])}
        self.bad = self.index["bad"]
        self.pixels = np.memmap(folder / self.PIXELS, dtype=np.uint8, mode="r",
                                shape=(max(1, len(self.row_of)), self.size, self.size))

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.row_of

    def get(self, image_id: str) -> np.ndarray:
        return self.pixels[self.row_of[image_id]]

    @staticmethod
    def key(images: list[tuple[str, str]], size: int) -> str:
        """A digest of the settings and the files (id, path, byte size) the cache holds."""
        digest = hashlib.sha256(json.dumps({"size": size, "version": CACHE_VERSION}).encode())
        for image_id, path in sorted(images):
            size_on_disk = os.path.getsize(path) if os.path.exists(path) else -1  # gone: named when read
            digest.update(f"{image_id}\0{path}\0{size_on_disk}\n".encode())
        return digest.hexdigest()[:16]

    @classmethod
    def build(cls, images: list[tuple[str, str]], size: int, root: str | os.PathLike,
              max_pixels: int = 60_000_000, bad_image: str = "stop") -> ImageCache:
        """Decode every ``(image_id, path)`` once into ``root/<key>/``; reuse it if present.

        ``bad_image="stop"`` raises at the first unreadable file (naming it);
        ``"skip"`` leaves it out and records why in ``index.json``.
        """
        key = cls.key(images, size)
        folder = Path(root) / f"{size}px-{key}"
        if (folder / cls.INDEX).exists():
            log.info("image cache %s already built (%d images)", folder, len(images))
            return cls(folder)
        building = folder.with_name(folder.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        ordered = sorted(images)
        kept, bad = [], {}
        try:
            pixels = _reserved_memmap(building / cls.PIXELS, (max(1, len(ordered)), size, size), folder)
            for image_id, path in tqdm(ordered, desc=f"caching images at {size}px", unit="img"):
                try:
                    pixels[len(kept)] = load_image(path, size, max_pixels)
                except ImageError as exc:
                    if bad_image == "stop":
                        raise
                    log.warning("skipping %s", exc)
                    bad[image_id] = str(exc)
                    continue
                kept.append(image_id)
            pixels.flush()
            del pixels
            (building / cls.INDEX).write_text(json.dumps(
                {"size": size, "key": key, "image_ids": kept, "bad": bad}))
            os.replace(building, folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        if bad:
            log.warning("%d of %d images skipped as unreadable (listed in %s)",
                        len(bad), len(ordered), folder / cls.INDEX)
        return cls(folder)
