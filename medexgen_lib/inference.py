"""Reports for new images: PNG, JPEG or DICOM in, text (and the labeler's observations) out."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medexgen_lib.config import RANGES, EvalConfig, ImagesConfig
from medexgen_lib.reporting import decode_settings
from medexgen_lib.files import read_capped
from medexgen_lib.images import (ImageError, check_radiograph_shape, load_image, normalize,
                                 stretch_to_uint8)
from medexgen_lib.metrics import prediction_labels
from medexgen_lib.model import MAX_CONFIG_BYTES, ReportGenerator
from medexgen_lib.postprocess import post_process

log = logging.getLogger(__name__)
DECODE_FIELDS = ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")


def check_decode(key: str, value, source: str) -> None:
    """Refuse decoding setting ``key`` (one of ``DECODE_FIELDS``) where ``value`` is not of
    ``EvalConfig``'s type, not finite or outside ``config.RANGES``; ``ValueError`` naming
    ``source`` (the file and field, or the command-line flag)."""
    kind = type(getattr(EvalConfig(), key))
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        wanted = "a number" if kind is float else "an integer"
        raise ValueError(f"{source} must be {wanted}, got {type(value).__name__} {value!r}"[:300])
    if not math.isfinite(value):
        raise ValueError(f"{source} must be a finite number, got {value!r}")
    low, high = RANGES.get(f"eval.{key}", (None, None))
    if low is not None and value < low:
        raise ValueError(f"{source} must be at least {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{source} must be at most {high}, got {value!r}")


def _evaluated_decode(model_dir: Path) -> tuple[dict, str] | None:
    """The decoding of the evaluation the model card records (the test split's first), or None;
    an unreadable card is named in a warning and left aside."""
    from medexgen_lib.model_card import CARD_FILE, FACTS_KEY, card_data

    if not (model_dir / CARD_FILE).exists():
        return None
    try:
        results = card_data(model_dir / CARD_FILE)[FACTS_KEY]["results"]
    except ValueError as exc:
        log.warning("%s; its decoding settings are not used", exc)
        return None
    except (OSError, KeyError, TypeError):
        return None
    for split in sorted(results, key=lambda name: name != "test"):
        if isinstance(results[split], dict) and isinstance(results[split].get("decode"), dict):
            return results[split]["decode"], f"{model_dir / CARD_FILE} ({split} results)"
    return None


def saved_decode(model: ReportGenerator, model_dir: str | os.PathLike,
                 given: dict | None = None) -> EvalConfig:
    """The decoding ``model`` (loaded from ``model_dir``) was evaluated with, so that ``generate``
    writes the reports that were scored: the evaluation its model card records (test split
    first), else the ``eval`` settings of the run that trained it (``run_config.json``), else
    ``EvalConfig``'s defaults. A saved ``max_new_tokens`` is cut to what the decoder's positions
    allow, as evaluation cuts it. Each setting of ``given`` that is not None replaces the saved one
    (a too large ``max_new_tokens`` is cut, with a warning, when generating); where all of
    ``DECODE_FIELDS`` are given, nothing saved is read."""
    model_dir = Path(model_dir)
    given = {key: value for key, value in (given or {}).items() if value is not None}
    if set(DECODE_FIELDS) <= set(given):
        log.info("decoding as given: %s", {key: given[key] for key in DECODE_FIELDS})
        return dataclasses.replace(EvalConfig(), **given)
    found = _evaluated_decode(model_dir)
    run_config = model_dir / "run_config.json"
    if found is None and run_config.exists():
        try:  # capped: a link to /dev/zero or a FIFO is refused, not read
            found = json.loads(read_capped(run_config, MAX_CONFIG_BYTES).decode("utf-8"))["eval"], str(run_config)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"cannot read the evaluation settings in {run_config}: {exc}") from None
    if found is None:
        log.info("%s records no evaluation settings; decoding with the defaults", model_dir)
        decode = EvalConfig()
    else:
        settings, source = found
        if not isinstance(settings, dict):
            raise ValueError(f"{source}: the evaluation settings must be an object, got {type(settings).__name__}")
        for key in DECODE_FIELDS:
            if key in settings:
                check_decode(key, settings[key], f"{source}: {key}")
        decode = dataclasses.replace(EvalConfig(), **{k: settings[k] for k in DECODE_FIELDS if k in settings})
        log.info("decoding as evaluated (%s): %s", source, {k: getattr(decode, k) for k in DECODE_FIELDS})
    room = model.config.n_positions - 1 - model.prompt_length
    saved = dataclasses.replace(decode, max_new_tokens=min(decode.max_new_tokens, room))
    return dataclasses.replace(saved, **given)


# Deflated DICOM is inflated as it is read, never past what its header declares: the header
# itself at most this many bytes, the whole data set its declared pixels plus this slack (element
# headers, trailing elements, padding).
DEFLATED_HEADER_BYTES = 8 * 2**20
DEFLATED_SLACK_BYTES = 2**20
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float and integer pixel data


def is_dicom(path: Path) -> bool:
    """DICOM files carry 'DICM' at byte 128 (a .dcm suffix alone is not trusted)."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


class _BoundedInflate:
    """The body of a Deflated Explicit VR Little Endian file as a seekable file, inflated from
    ``handle`` as far as it is read and never past ``limit`` bytes (``ImageError`` beyond)."""

    def __init__(self, handle, path: Path, limit: int):
        self.handle, self.name, self.limit = handle, str(path), limit
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.data, self.position, self.pending = bytearray(), 0, b""

    def _fill(self, size: int) -> None:
        while len(self.data) < size and not self.inflater.eof:
            if not self.pending:
                self.pending = self.handle.read(2**16)
                if not self.pending:
                    return  # a truncated stream ends the data; the reader names what is missing
            want = min(self.limit + 1, max(size, len(self.data) + 2**16)) - len(self.data)
            try:  # no more than asked for (and a little read-ahead): zeros inflate 1000-fold
                self.data += self.inflater.decompress(self.pending, want)
            except zlib.error as exc:
                raise ImageError(f"cannot inflate DICOM {self.name} (Deflated Explicit VR Little "
                                 f"Endian): {exc}") from None
            self.pending = self.inflater.unconsumed_tail
            if len(self.data) > self.limit:
                raise ImageError(f"DICOM {self.name} (Deflated Explicit VR Little Endian) inflates past "
                                 f"{self.limit} bytes, more than its header and declared pixels need; "
                                 "refused as a possible decompression bomb")

    def read(self, size: int = -1) -> bytes:
        self._fill(self.limit + 1 if size < 0 else self.position + size)
        end = len(self.data) if size < 0 else self.position + size
        chunk = bytes(self.data[self.position:end])
        self.position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(self.limit + 1)
        self.position = max(0, offset + (0, self.position, len(self.data))[whence])
        return self.position

    def tell(self) -> int:
        return self.position


def _declared_pixel_bytes(path, header, max_pixels: int) -> int:
    """Bytes of pixel data the header declares, after checking rows x columns x samples x frames
    against ``max_pixels`` (before any pixel is read)."""
    try:
        rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        bits = int(header.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"DICOM {path} has an unreadable image size in its header: {exc}") from None
    if rows * columns * frames * samples > max_pixels:
        colour = f" x {samples} samples" if samples != 1 else ""
        raise ImageError(f"DICOM {path} declares {rows}x{columns} pixels x {frames} frame(s){colour}, over "
                         f"images.max_pixels ({max_pixels}); refused before decoding as a "
                         "possible decompression bomb")
    return rows * columns * frames * samples * -(-min(max(bits, 1), 64) // 8)


def _read_dicom_dataset(path: Path, max_pixels: int):
    """The data set of a DICOM file, its declared size checked against ``max_pixels`` from the
    header before any pixel is read. A deflated file is inflated only as far as its header and
    declared pixels go (``_BoundedInflate``), where ``dcmread`` would inflate all of it first."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with open(path, "rb") as handle:
        preamble = read_preamble(handle, False)
        meta = FileMetaDataset(read_dataset(handle, False, True, stop_when=lambda tag, *_: tag.group != 2))
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            body = _BoundedInflate(handle, path, DEFLATED_HEADER_BYTES)
            header = read_dataset(body, False, True, stop_when=lambda tag, *_: tag in _PIXEL_TAGS)
            body.limit = body.tell() + _declared_pixel_bytes(path, header, max_pixels) + DEFLATED_SLACK_BYTES
            body.seek(0)
            return FileDataset(str(path), read_dataset(body, False, True), preamble, meta, False, True)
    _declared_pixel_bytes(path, pydicom.dcmread(path, stop_before_pixels=True), max_pixels)
    return pydicom.dcmread(path)


# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic; JPEG-LS's SOF55)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def _codestream_sizes(frame: bytes) -> list[tuple[int, int]] | None:
    """(rows, columns) of every frame header of a JPEG / JPEG-LS codestream (each SOF before
    the scan) or of a JPEG 2000 one (its SIZ); None where ``frame`` is neither."""
    if frame[:2] == b"\xff\xd8":
        sizes, at = [], 2
        while at + 4 <= len(frame):
            if frame[at] != 0xFF:
                return sizes
            marker = frame[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
                at += 2
                continue
            if marker == 0xDA:  # start of scan: the frame headers are all read
                return sizes
            if marker in _JPEG_SOF and at + 9 <= len(frame):
                sizes.append((int.from_bytes(frame[at + 5:at + 7], "big"), int.from_bytes(frame[at + 7:at + 9], "big")))
            at += 2 + int.from_bytes(frame[at + 2:at + 4], "big")
        return sizes
    siz = frame.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ (also inside a JP2 file's box)
    if siz >= 0 and siz + 24 <= len(frame):
        x, y, x0, y0 = (int.from_bytes(frame[siz + 8 + 4 * i:siz + 12 + 4 * i], "big") for i in range(4))
        return [(y - y0, x - x0)]
    return None


def _rle_segment_bytes(segment: bytes, limit: int) -> int:
    """Bytes a PackBits segment of RLE Lossless decodes to, counted (not decoded) and no further
    than just past ``limit``."""
    at, count = 0, 0
    while at < len(segment) and count <= limit:
        header = segment[at]
        if header < 128:  # a literal run of header + 1 bytes
            count, at = count + header + 1, at + header + 2
        elif header > 128:  # one byte repeated 257 - header times
            count, at = count + 257 - header, at + 2
        else:
            at += 1
    return count


def _check_encapsulated_frames(path: Path, ds) -> None:
    """Each compressed frame must be the size the DICOM header declares before it is decoded:
    the JPEG decoders size their output from the codestream's own header (a file declaring
    256x256 may hold a 13000x13000 JPEG), and an RLE segment decodes as far as its runs go."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import RLELossless

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated:
        return
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        for number, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames), 1):
            if syntax == RLELossless:
                count = int.from_bytes(frame[:4], "little")
                offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(min(count, 15))]
                for start, end in zip(offsets, offsets[1:] + [len(frame)]):
                    if _rle_segment_bytes(frame[start:end], rows * columns + 1) > rows * columns + 1:
                        raise ImageError(f"DICOM {path}: an RLE segment of frame {number} decodes past the "
                                         f"declared {rows}x{columns} pixels; refused as a possible "
                                         "decompression bomb")
                continue
            sizes = _codestream_sizes(frame)
            if not sizes or any(size != (rows, columns) for size in sizes):
                found = "no readable frame size" if not sizes else " and ".join(f"{r}x{c}" for r, c in sizes)
                raise ImageError(f"DICOM {path}: compressed frame {number} holds {found}, the header declares "
                                 f"{rows}x{columns}; refused before decoding (a possible decompression bomb)")
    except ImageError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ImageError(f"cannot read the compressed frames of DICOM {path}: {exc}") from None


def _luma(pixels: np.ndarray) -> np.ndarray:
    """Colour pixels (RGB, last axis) to gray by PIL's ``convert("L")`` rule (ITU-R 601-2 luma,
    L = R * 299/1000 + G * 587/1000 + B * 114/1000), as PNG and JPEG are read: 8-bit data through
    PIL itself, deeper data (which PIL cannot convert) with the same weights."""
    if pixels.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(pixels), "RGB").convert("L"))
    return pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_dicom(path: str | os.PathLike, size: int, max_pixels: int = 60_000_000) -> np.ndarray:
    """A DICOM radiograph as ``size``² uint8 gray, displayed as pydicom documents it: the
    modality LUT (rescale slope/intercept) first, then the VOI LUT or window, MONOCHROME1
    inverted. Rows x columns x samples x frames declared in the header are checked against
    ``max_pixels`` before any pixel is decoded (a compressed bomb is refused unread; a deflated
    file is inflated no further than its header declares). Colour (RGB, and YBR as pydicom
    converts it to RGB, PALETTE COLOR through its lookup table) becomes gray by the luma PNG and
    JPEG get (``_luma``). An image of one
    value throughout (a constant, a rescale slope of 0) is refused: it shows nothing."""
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = _read_dicom_dataset(path, max_pixels)
    except ImageError:
        raise
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read DICOM {path}: {exc}") from None
    if "PixelData" not in ds:
        raise ImageError(f"DICOM {path} has no pixel data (PixelData element missing)")
    _check_encapsulated_frames(path, ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # unsupported transfer syntax, truncated data, missing decoder
        raise ImageError(f"cannot decode the pixels of DICOM {path}: {exc}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if getattr(ds, "PhotometricInterpretation", "") == "PALETTE COLOR":
        try:  # the pixels are indices into the palette: their colours, not the indices, are the image
            pixels = apply_color_lut(pixels, ds)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ImageError(f"DICOM {path} has an unusable PALETTE COLOR lookup table: {exc}") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = _luma(pixels[..., :3])
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
    if values.min() == values.max():
        raise ImageError(f"DICOM {path} is uniform: every pixel is {values.min():g} after its rescale "
                         "slope/intercept and window; there is no image to report on")
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = values.max() - values  # MONOCHROME1: bright means low values
    return np.asarray(stretch_to_uint8(values).resize((size, size), Image.Resampling.BILINEAR))


def read_radiograph(path: str | os.PathLike, size: int, max_pixels: int = 60_000_000) -> np.ndarray:
    """PNG, JPEG or DICOM -> ``size``² uint8 gray, with one clear error for anything else: a
    path that is missing, a folder or not a regular file (a FIFO would block), an undecodable
    file, or an image of one value throughout (blank, nothing to report on)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} does not exist")
    if path.is_dir():
        raise ImageError(f"image {path} is a directory, not an image file")
    if not path.is_file():
        raise ImageError(f"image {path} is not a regular file (a FIFO, device or socket)")
    if is_dicom(path):
        return read_dicom(path, size, max_pixels)
    pixels = load_image(path, size, max_pixels)
    if pixels.min() == pixels.max():
        raise ImageError(f"image {path} is uniform: every pixel is {pixels.min()}; there is no "
                         "image to report on")
    return pixels


@torch.no_grad()
def generate_report(model: ReportGenerator, images: list[str | os.PathLike],
                    decode: EvalConfig | None = None, missing_view: str = "duplicate",
                    max_pixels: int = ImagesConfig.max_pixels) -> dict:
    """The report for one study: ``images`` = [frontal] or [frontal, lateral]; an image over
    ``max_pixels`` (``images.max_pixels``) is refused before decoding. The result holds the
    report, the decoder's own text (``decoder_text``) and the names of the post-processing steps
    that changed it (``post_processing``, ``postprocess.STEPS``; empty where none did).

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
        drafts, probabilities = model.decode_reports(pixels, torch.tensor([mask], device=device),
                                                     **decode_settings(decode or EvalConfig()))
    finally:
        model.train(was_training)
    edited = post_process(drafts, probabilities, model.config)
    report = edited.texts[0]
    # the scoring rule: a degenerate report (or decoder text) states nothing
    labels = prediction_labels(report, drafts[0])
    return {"images": [str(p) for p in images], "report": report, "decoder_text": drafts[0],
            "post_processing": edited.changed_by[0],
            "observations": {k: v for k, v in labels.items() if v != "absent"}}
