"""Reports for new images: PNG, JPEG or DICOM in, text (and the labeler's observations) out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medexgen_lib.config import EvalConfig, ImagesConfig
from medexgen_lib.evaluate import decode_settings
from medexgen_lib.images import (ImageError, check_radiograph_shape, load_image, normalize,
                                 stretch_to_uint8)
from medexgen_lib.metrics import prediction_labels
from medexgen_lib.model import ReportGenerator

log = logging.getLogger(__name__)
DECODE_FIELDS = ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")


def _evaluated_decode(model_dir: Path) -> tuple[dict, str] | None:
    """The decoding of the evaluation the model card records (the test split's first), or None."""
    import yaml
    from huggingface_hub import ModelCard

    from medexgen_lib.model_card import CARD_FILE, FACTS_KEY

    try:
        results = ModelCard.load(model_dir / CARD_FILE).data.to_dict()[FACTS_KEY]["results"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    for split in sorted(results, key=lambda name: name != "test"):
        if isinstance(results[split], dict) and isinstance(results[split].get("decode"), dict):
            return results[split]["decode"], f"{model_dir / CARD_FILE} ({split} results)"
    return None


def saved_decode(model: ReportGenerator, model_dir: str | os.PathLike) -> EvalConfig:
    """The decoding ``model`` (loaded from ``model_dir``) was evaluated with, so that ``generate``
    writes the reports that were scored: the evaluation its model card records (test split
    first), else the ``eval`` settings of the run that trained it (``run_config.json``), else
    ``EvalConfig``'s defaults. ``max_new_tokens`` is cut to what the decoder's positions allow,
    as evaluation cuts it."""
    model_dir = Path(model_dir)
    found = _evaluated_decode(model_dir)
    if found is None and (model_dir / "run_config.json").exists():
        try:
            found = json.loads((model_dir / "run_config.json").read_text())["eval"], str(model_dir / "run_config.json")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the evaluation settings in {model_dir / 'run_config.json'}: {exc}") from None
    if found is None:
        log.info("%s records no evaluation settings; decoding with the defaults", model_dir)
        decode = EvalConfig()
    else:
        settings, source = found
        decode = dataclasses.replace(EvalConfig(), **{k: settings[k] for k in DECODE_FIELDS if k in settings})
        log.info("decoding as evaluated (%s): %s", source, {k: getattr(decode, k) for k in DECODE_FIELDS})
    room = model.config.n_positions - 1 - model.prompt_length
    return dataclasses.replace(decode, max_new_tokens=min(decode.max_new_tokens, room))


def is_dicom(path: Path) -> bool:
    """DICOM files carry 'DICM' at byte 128 (a .dcm suffix alone is not trusted)."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_dicom(path: str | os.PathLike, size: int, max_pixels: int = 60_000_000) -> np.ndarray:
    """A DICOM radiograph as ``size``² uint8 gray, displayed as pydicom documents it: the
    modality LUT (rescale slope/intercept) first, then the VOI LUT or window, MONOCHROME1
    inverted. Rows x columns x frames declared in the header are checked against
    ``max_pixels`` before any pixel is decoded (a compressed bomb is refused unread)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read DICOM {path}: {exc}") from None
    if "PixelData" not in ds:
        raise ImageError(f"DICOM {path} has no pixel data (PixelData element missing)")
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"DICOM {path} has an unreadable image size in its header: {exc}") from None
    if rows * columns * frames > max_pixels:
        raise ImageError(f"DICOM {path} declares {rows}x{columns} pixels x {frames} frame(s), over "
                         f"images.max_pixels ({max_pixels}); refused before decoding as a "
                         "possible decompression bomb")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # unsupported transfer syntax, truncated data, missing decoder
        raise ImageError(f"cannot decode the pixels of DICOM {path}: {exc}") from None
    if frames > 1:
        pixels = pixels[0]
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    if pixels.ndim != 2:
        raise ImageError(f"DICOM {path} has pixels of shape {pixels.shape}; expected one 2-D image")
    check_radiograph_shape(path, pixels.shape[1], pixels.shape[0])
    try:
        values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float32)
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # a text slope, a zero width
        raise ImageError(f"DICOM {path} has an unusable rescale or window in its header: {exc}") from None
    if not np.isfinite(values).all():
        raise ImageError(f"DICOM {path}: its rescale slope/intercept or window give non-finite "
                         "pixel values (NaN or infinity); refused rather than shown blank")
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = values.max() - values  # MONOCHROME1: bright means low values
    return np.asarray(stretch_to_uint8(values).resize((size, size), Image.Resampling.BILINEAR))


def read_radiograph(path: str | os.PathLike, size: int, max_pixels: int = 60_000_000) -> np.ndarray:
    """PNG, JPEG or DICOM -> ``size``² uint8 gray, with one clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    if is_dicom(path):
        return read_dicom(path, size, max_pixels)
    return load_image(path, size, max_pixels)


@torch.no_grad()
def generate_report(model: ReportGenerator, images: list[str | os.PathLike],
                    decode: EvalConfig | None = None, missing_view: str = "duplicate",
                    max_pixels: int = ImagesConfig.max_pixels) -> dict:
    """The report for one study: ``images`` = [frontal] or [frontal, lateral]; an image over
    ``max_pixels`` (``images.max_pixels``) is refused before decoding.

    Runs the model in eval mode (restored afterwards), so the same files and settings
    always give the same report and never change the weights or BatchNorm statistics."""
    if not 1 <= len(images) <= 2:
        raise ValueError(f"give one or two images (frontal, then lateral), got {len(images)}")
    size = model.config.image_size
    views = [torch.tensor(read_radiograph(p, size, max_pixels)) for p in images]
    mask = [True, len(views) == 2]
    if len(views) == 1:
        views.append(views[0] if missing_view == "duplicate" else torch.zeros_like(views[0]))
        mask[1] = missing_view == "duplicate"
    device = next(model.parameters()).device
    pixels = normalize(torch.stack(views).unsqueeze(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        drafts, reports = model.draft_and_write(pixels, torch.tensor([mask], device=device),
                                                **decode_settings(decode or EvalConfig()))
    finally:
        model.train(was_training)
    # the scoring rule: a degenerate report (or decoder text) states nothing
    labels = prediction_labels(reports[0], drafts[0])
    return {"images": [str(p) for p in images], "report": reports[0], "decoder_text": drafts[0],
            "observations": {k: v for k, v in labels.items() if v != "absent"}}
