"""Reports for new images from PNG, JPEG and DICOM files the test writes; bad inputs."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from medexgen_lib.__main__ import main
from medexgen_lib.config import EvalConfig, ModelConfig
from medexgen_lib.images import ImageError
from medexgen_lib.inference import generate_report, read_dicom, read_radiograph
from medexgen_lib.model import ReportGenerator
from medexgen_lib.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(["Heart size normal. No pleural effusion."] * 20, 300)
    cfg = ModelConfig(encoder="resnet18", encoder_pretrained=False, decoder_pretrained=False,
                      n_layer=1, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("model") / "final"
    ReportGenerator.build(cfg, tokenizer, 64, 32).save_pretrained(path)
    return path


def _chest(h=120, w=100):
    y, x = np.mgrid[0:h, 0:w]
    return ((x + y) * 255 / (h + w)).astype(np.uint8)


def dicom_dataset(transfer_syntax):
    """An empty secondary-capture DX dataset with file meta for ``transfer_syntax`` (a pydicom UID)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    return ds


def write_dicom(path, pixels, photometric="MONOCHROME2", with_pixels=True, window=None):
    from pydicom.uid import ExplicitVRLittleEndian

    ds = dicom_dataset(ExplicitVRLittleEndian)
    if with_pixels:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_generate_from_png_jpeg_and_dicom(model_dir, tmp_path, capsys):
    frontal, lateral = tmp_path / "f.png", tmp_path / "l.jpg"
    Image.fromarray(_chest()).save(frontal)
    Image.fromarray(_chest()).save(lateral)
    dicom = write_dicom(tmp_path / "f.dcm", _chest().astype(np.uint16) * 16)
    model = ReportGenerator.from_pretrained(model_dir)
    reports = {}
    for images in ([frontal], [frontal, lateral], [dicom, lateral]):
        result = generate_report(model, images)
        assert result["images"] == [str(p) for p in images] and result["report"]
        reports[len(reports)] = result["report"]
    assert main(["generate", "--model", str(model_dir), str(dicom), "--json", "--beams", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == [str(dicom)]
    assert printed["report"] == generate_report(model, [dicom], EvalConfig(num_beams=1))["report"]


def test_generate_is_deterministic_and_leaves_the_model_untouched(model_dir, tmp_path, capsys):
    frontal = tmp_path / "f.png"
    Image.fromarray(_chest()).save(frontal)
    model = ReportGenerator.from_pretrained(model_dir)
    assert not model.training and not any(m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # even a model left in training mode by its caller
    reports = [generate_report(model, [frontal])["report"] for _ in range(3)]
    assert len(set(reports)) == 1
    assert model.training  # the caller's mode is restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    printed = []
    for _ in range(2):
        assert main(["generate", "--model", str(model_dir), str(frontal)]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].strip() == reports[0]


def test_dicom_monochrome1_is_inverted_and_windowing_applied(tmp_path):
    pixels = _chest().astype(np.uint16) * 16
    normal = read_dicom(write_dicom(tmp_path / "m2.dcm", pixels), 64).astype(int)
    inverted = read_dicom(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"), 64).astype(int)
    assert np.abs(normal + inverted - 255).max() <= 1
    windowed = read_dicom(write_dicom(tmp_path / "w.dcm", pixels, window=(2040, 400)), 64)
    assert (windowed == 0).mean() > 0.2 and (windowed == 255).mean() > 0.2  # outside the window clips


@pytest.mark.parametrize("case, message", [
    ("text", "cannot read image"), ("missing", "does not exist"),
    ("dicom_without_pixels", "no pixel data"), ("empty", "cannot read image"),
    ("icon", "1x1 pixels: not radiograph-shaped"), ("strip", "40x400 pixels: not radiograph-shaped"),
    ("dicom_strip", "40x400 pixels: not radiograph-shaped"),
])
@pytest.mark.reliability
def test_bad_inputs_get_one_clear_error(case, message, tmp_path, model_dir, capsys):
    path = tmp_path / "input.png"
    if case == "text":
        path.write_text("not an image")
    elif case == "dicom_without_pixels":
        path = write_dicom(tmp_path / "x.dcm", None, with_pixels=False)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "icon":
        Image.new("L", (1, 1)).save(path)
    elif case == "strip":
        Image.fromarray(_chest(400, 40)).save(path)
    elif case == "dicom_strip":
        path = write_dicom(tmp_path / "x.dcm", _chest(400, 40).astype(np.uint16) * 16)
    with pytest.raises(ImageError, match=message):
        read_radiograph(path, 64)
    assert main(["generate", "--model", str(model_dir), str(path)]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.reliability
def test_wrong_number_of_images(model_dir, tmp_path):
    Image.fromarray(_chest()).save(tmp_path / "a.png")
    model = ReportGenerator.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="one or two images"):
        generate_report(model, [tmp_path / "a.png"] * 3)


def _rle_bomb(path, rows, columns, frames=1):
    """An RLE Lossless DICOM whose header declares ``rows`` x ``columns`` x ``frames`` 8-bit pixels;
    its pixel data is a few runs (a real 30000x30000 one compresses to 14 MB and decodes to 900 MB)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = dicom_dataset(RLELossless)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    segment = b"\x81\x00" * 64  # each pair: 128 zero pixels
    frame = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56) + segment
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.reliability
@pytest.mark.parametrize("rows, columns, frames", [(30000, 30000, 1), (6000, 6000, 2)])
def test_a_dicom_bomb_is_refused_from_its_header(rows, columns, frames, tmp_path, model_dir,
                                                 capsys, monkeypatch):
    from pydicom.dataset import Dataset

    path = _rle_bomb(tmp_path / "bomb.dcm", rows, columns, frames)
    monkeypatch.setattr(Dataset, "pixel_array",
                        property(lambda ds: pytest.fail("pixels decoded before the size check")))
    message = f"bomb.dcm declares {rows}x{columns} pixels x {frames} frame\\(s\\), over images.max_pixels"
    with pytest.raises(ImageError, match=message):
        read_radiograph(path, 64)
    assert main(["generate", "--model", str(model_dir), str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "bomb.dcm declares" in error[0]


def _encapsulated_dicom(path, rows, columns, syntax, frame: bytes):
    """An 8-bit gray DICOM declaring ``rows`` x ``columns`` whose one compressed frame is ``frame``."""
    from pydicom.encaps import encapsulate

    ds = dicom_dataset(syntax)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg(pixels, declared=None) -> bytes:
    """A baseline JPEG of ``pixels``; ``declared`` (rows, columns) rewrites its frame header's size."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    data = bytearray(buffer.getvalue())
    if declared:
        at = data.find(b"\xff\xc0")
        data[at + 5:at + 9] = declared[0].to_bytes(2, "big") + declared[1].to_bytes(2, "big")
    return bytes(data)


@pytest.mark.reliability
@pytest.mark.parametrize("case", ["JPEG frame larger than declared", "RLE runs past the declared size"])
def test_a_compressed_frame_bigger_than_its_header_is_refused_before_decoding(case, tmp_path, monkeypatch):
    """A JPEG baseline DICOM declaring 256x256 and holding a 13000x13000 frame, or RLE whose runs
    decode past the declared pixels, was decoded in full, past images.max_pixels."""
    from pydicom.dataset import Dataset
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    if case.startswith("JPEG"):
        frame = _jpeg(_chest(64, 64), declared=(13000, 13000))
        path = _encapsulated_dicom(tmp_path / "bomb.dcm", 256, 256, JPEGBaseline8Bit, frame)
        message = "compressed frame 1 holds 13000x13000, the header declares 256x256"
    else:
        segment = b"\x81\x00" * 5000  # 640,000 zero bytes
        frame = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56) + segment
        path = _encapsulated_dicom(tmp_path / "bomb.dcm", 64, 64, RLELossless, frame)
        message = "an RLE segment of frame 1 decodes past the declared 64x64 pixels"
    monkeypatch.setattr(Dataset, "pixel_array",
                        property(lambda ds: pytest.fail("pixels decoded before the frame size check")))
    with pytest.raises(ImageError, match=f"bomb.dcm: {message}"):
        read_dicom(path, 64)


def test_compressed_frames_of_the_declared_size_are_read(tmp_path):
    from pydicom import dcmread
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    chest = _chest(64, 64)
    jpeg = _encapsulated_dicom(tmp_path / "j.dcm", 64, 64, JPEGBaseline8Bit, _jpeg(chest))
    assert np.abs(read_dicom(jpeg, 64).astype(int) - read_dicom(write_dicom(tmp_path / "m.dcm", chest), 64)).max() < 12
    ds = dcmread(write_dicom(tmp_path / "r.dcm", chest.astype(np.uint16) * 16))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert np.array_equal(read_dicom(tmp_path / "rle.dcm", 64), read_dicom(tmp_path / "r.dcm", 64))


@pytest.mark.reliability
def test_dicom_rescale_is_applied_before_the_window(tmp_path):
    import pydicom

    stored = np.tile(np.linspace(0, 4095, 200).round(), (200, 1))  # columns: stored 0 .. 4095
    path = write_dicom(tmp_path / "ct.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.RescaleIntercept, ds.RescaleSlope = -1000, 1  # stored 0 .. 4095 -> -1000 .. 3095
    ds.WindowCenter, ds.WindowWidth = 1500, 2000  # 500 .. 2500 after rescale = stored 1500 .. 3500
    ds.save_as(path)
    out = read_dicom(path, 200)
    black, white = (out == 0).mean(), (out == 255).mean()
    assert abs(black - 1500 / 4096) < 0.03 and abs(white - 595 / 4096) < 0.03, (black, white)


@pytest.mark.reliability
@pytest.mark.parametrize("field, value, message", [
    ("encoder", "get_model", "'encoder' must be one of resnet18, resnet34, resnet50, resnet101, got 'get_model'"),
    ("encoder", "alexnet", "'encoder' must be one of .*got 'alexnet'"),
    ("image_size", "64", "'image_size' must be int, got str '64'"),
    ("n_head", -2, "'n_head' must not be negative"),
])
def test_a_hostile_model_config_names_the_field(field, value, message, model_dir, tmp_path, capsys):
    import shutil

    hostile = tmp_path / "model"
    shutil.copytree(model_dir, hostile)
    config = json.loads((hostile / "config.json").read_text())
    (hostile / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"config.json: model config field {message}"):
        ReportGenerator.from_pretrained(hostile)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"field '{field}'" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("header, message", [
    ({"WindowCenter": "100", "WindowWidth": "0"}, "unusable rescale or window.*Window Width"),
    ({"WindowCenter": "100", "WindowWidth": "-5"}, "unusable rescale or window.*Window Width"),
    ({"WindowCenter": "100", "WindowWidth": "10", "VOILUTFunction": "WEIRD"}, "unusable.*'WEIRD'"),
    ({"RescaleSlope": "@SLOPE", "RescaleIntercept": "0"}, "unusable rescale or window"),
    ({"WindowCenter": "@CENTER", "WindowWidth": "10"}, "unusable rescale or window"),
    ({"RescaleSlope": "nan", "RescaleIntercept": "0"}, "non-finite pixel values"),
])
def test_a_dicom_with_a_hostile_rescale_or_window_gets_one_error(header, message, tmp_path,
                                                                 model_dir, capsys):
    """These raised a raw ValueError/TypeError from pydicom (or, for NaN, gave a black image)."""
    import pydicom

    path = write_dicom(tmp_path / "w.dcm", np.tile(np.arange(64) * 60, (64, 1)))
    ds = pydicom.dcmread(path)
    for key, value in header.items():
        setattr(ds, key, "7.5" if value.startswith("@") else value)
    ds.save_as(path)
    if any(value.startswith("@") for value in header.values()):  # text where a number belongs
        path.write_bytes(path.read_bytes().replace(b"7.5 ", b"abc ", 1))
    with pytest.raises(ImageError, match=f"DICOM .*w.dcm.*{message}"):
        read_dicom(path, 64)
    assert main(["generate", "--model", str(model_dir), str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "w.dcm" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("field, value, message", [
    ("dropout", float("nan"), r"'dropout' must be in \[0.0, 1.0\], got nan"),
    ("dropout", 5.0, r"'dropout' must be in \[0.0, 1.0\], got 5.0"),
    ("n_head", 0, r"'n_head' must be in \[1, 256\], got 0"),
    ("n_head", 7, r"'n_embd' \(\d+\) must be a multiple of 'n_head' \(7\)"),
    ("image_size", 16, r"'image_size' must be in \[32, 4096\], got 16"),
    ("image_size", 10**9, r"'image_size' must be in \[32, 4096\], got 1000000000"),
    ("n_views", 1, r"'n_views' must be in \[2, 8\], got 1"),
    ("eos_token_id", 10**6, r"'eos_token_id' \(1000000\) must be at most"),
])
def test_a_model_config_out_of_range_names_the_field(field, value, message, model_dir, tmp_path,
                                                     capsys):
    """Types alone let these through: a raw ZeroDivisionError (n_head 0), an allocation of
    petabytes (image_size 1e9), NaN dropout accepted by torch, a token id past the vocabulary."""
    import shutil

    hostile = tmp_path / "model"
    shutil.copytree(model_dir, hostile)
    config = json.loads((hostile / "config.json").read_text())
    (hostile / "config.json").write_text(json.dumps({**config, field: value}))  # NaN as JSON's NaN
    with pytest.raises(ValueError, match=f"config.json: model config field {message}"):
        ReportGenerator.from_pretrained(hostile)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"'{field}'" in error[0] and "config.json" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000])
def test_a_model_config_json_not_utf8_or_nested_too_deep_names_the_file(content, model_dir,
                                                                        tmp_path, capsys):
    """These gave "error: 'utf-8' codec can't decode ..." or "maximum recursion depth exceeded"
    without naming the file."""
    import shutil

    hostile = tmp_path / "model"
    shutil.copytree(model_dir, hostile)
    (hostile / "config.json").write_bytes(content)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "config.json is not valid JSON" in error[0]


@pytest.mark.reliability
def test_every_image_size_the_config_allows_loads_back(model_dir):
    """The model's image_size bound is the config's: no trained model is refused at load time."""
    from medexgen_lib.config import MAX_IMAGE_SIZE, ConfigError, load_config
    from medexgen_lib.model import ReportGeneratorConfig

    values = json.loads((model_dir / "config.json").read_text())
    assert ReportGeneratorConfig.from_dict({**values, "image_size": MAX_IMAGE_SIZE}).image_size == 4096
    assert load_config("demo", {"images.size": MAX_IMAGE_SIZE}).images.size == MAX_IMAGE_SIZE
    with pytest.raises(ConfigError, match=f"images.size must be a multiple of 32 from 32 to "
                                          f"{MAX_IMAGE_SIZE}, got {MAX_IMAGE_SIZE + 32}"):
        load_config("demo", {"images.size": MAX_IMAGE_SIZE + 32})


@pytest.mark.parametrize("text, no_finding", [
    ("Normal.", None),  # degenerate (one word): the scoring rule gives it no finding, "No Finding" included
    ("The heart is normal in size. The lungs are clear.", "positive")])
def test_generated_observations_follow_the_scoring_rule_for_degenerate_reports(text, no_finding, model_dir,
                                                                               tmp_path, monkeypatch):
    frontal = tmp_path / "f.png"
    Image.fromarray(_chest()).save(frontal)
    model = ReportGenerator.from_pretrained(model_dir)
    monkeypatch.setattr(model, "decode", lambda ids: [text])
    result = generate_report(model, [frontal])
    assert result["report"] == text and result["observations"].get("No Finding") == no_finding
    assert bool(result["observations"]) is (no_finding is not None)


def test_generate_decodes_as_the_model_was_evaluated_unless_flags_say_otherwise(model_dir, tmp_path, monkeypatch,
                                                                              caplog, capsys):
    import logging
    import shutil

    from medexgen_lib.config import load_config
    from medexgen_lib.model_card import build_card, export_facts

    frontal = tmp_path / "f.png"
    Image.fromarray(_chest()).save(frontal)
    calls = []
    original = ReportGenerator.decode_reports

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ReportGenerator, "decode_reports", spy)

    def generate(folder, *flags) -> dict:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["generate", "--model", str(folder), str(frontal), *flags]) == 0
        # no "max_new_tokens exceeds ..." on a default call
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("medexgen")]
        capsys.readouterr()
        return {k: calls[-1][k] for k in ("num_beams", "max_new_tokens", "length_penalty")}

    # no saved settings: the defaults, max_new_tokens cut to the decoder's room without a warning
    model = ReportGenerator.from_pretrained(model_dir)
    assert generate(model_dir)["max_new_tokens"] == model.config.n_positions - 1 - model.prompt_length
    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    (saved / "run_config.json").write_text(json.dumps(
        {"eval": {"num_beams": 2, "max_new_tokens": 7, "length_penalty": 0.5, "batch_size": 32}}))
    assert generate(saved) == {"num_beams": 2, "max_new_tokens": 7, "length_penalty": 0.5}  # training's eval
    assert generate(saved, "--beams", "3", "--max-new-tokens", "5") == {
        "num_beams": 3, "max_new_tokens": 5, "length_penalty": 0.5}
    # the evaluation its model card records (stage 05's decoding) comes first
    facts = export_facts(load_config("demo"), model, {"epoch": 1, "selection_metric": "clinical macro_F1",
                                                      "selection_value": 0.5, "fingerprint": "f", "val": {}}, {})
    facts["results"]["test"] = {"n": 1, "model": {}, "baselines": {}, "decode": {
        "num_beams": 1, "max_new_tokens": 9, "length_penalty": 1.0, "do_sample": False}}
    (saved / "README.md").write_text(str(build_card(facts)))
    assert generate(saved) == {"num_beams": 1, "max_new_tokens": 9, "length_penalty": 1.0}


def _deflated_dicom(path, rows, columns, pixel_chunks, declared_bytes=None):
    """A Deflated Explicit VR Little Endian DICOM whose header declares ``rows`` x ``columns``
    16-bit gray pixels and whose PixelData inflates to the bytes of ``pixel_chunks``; compressed
    chunk by chunk, so a bomb of many MB of zeros is built in little memory."""
    import io
    import struct
    import zlib

    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dicom_dataset(DeflatedExplicitVRLittleEndian)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    written = io.BytesIO()
    ds.save_as(written, enforce_file_format=True)  # no pixels yet: file meta + deflated header
    raw = io.BytesIO(written.getvalue())
    read_preamble(raw, False)
    read_dataset(raw, False, True, stop_when=lambda tag, *_: tag.group != 2)
    head, body = raw.getvalue()[:raw.tell()], zlib.decompress(raw.getvalue()[raw.tell():], -zlib.MAX_WBITS)
    chunks = list(pixel_chunks) if declared_bytes is None else pixel_chunks
    size = sum(len(c) for c in chunks) if declared_bytes is None else declared_bytes
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(head + deflate.compress(body + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)))
        for chunk in chunks:
            out.write(deflate.compress(chunk))
        out.write(deflate.flush())
    return path


def _zeros(total, chunk=2**20):
    block = bytes(chunk)
    for _ in range(total // chunk):
        yield block


@pytest.mark.reliability
def test_a_deflated_dicom_decodes_as_the_same_pixels_uncompressed(tmp_path):
    pixels = _chest().astype(np.uint16) * 16
    deflated = _deflated_dicom(tmp_path / "d.dcm", *pixels.shape, [pixels.tobytes()])
    plain = write_dicom(tmp_path / "p.dcm", pixels)
    assert np.array_equal(read_dicom(deflated, 64), read_dicom(plain, 64))


@pytest.mark.reliability
@pytest.mark.parametrize("rows, columns, message", [
    # 128 kB declared, 48 MB inflated
    (256, 256, "inflates past \\d+ bytes, more than its header and declared pixels need"),
    (30000, 30000, "declares 30000x30000 pixels x 1 frame\\(s\\), over images.max_pixels"),
])
def test_a_deflated_dicom_bomb_is_refused_without_inflating_it(rows, columns, message, tmp_path,
                                                                 model_dir, capsys):
    """dcmread inflated the whole file before the max_pixels check: 1.5 GB of zeros in a 1.46 MB
    file took generate to 3.8 GB of memory; 4 GB inflated ended in a MemoryError traceback."""
    import tracemalloc

    bomb = _deflated_dicom(tmp_path / "bomb.dcm", rows, columns, _zeros(48 * 2**20), 48 * 2**20)
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=f"DICOM .*bomb.dcm.* {message}"):
            read_radiograph(bomb, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB allocated to refuse a 128 kB image"
    assert main(["generate", "--model", str(model_dir), str(bomb)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "bomb.dcm" in error[0]


def write_colour_dicom(path, pixels, photometric="RGB"):
    """An 8-bit colour DICOM (pixel-interleaved) of ``pixels`` [H, W, 3] in ``photometric``."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = dicom_dataset(ExplicitVRLittleEndian)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.reliability
def test_palette_colour_dicom_becomes_gray_of_its_colours_not_of_its_indices(tmp_path):
    """PALETTE COLOR pixels are indices into a colour table; they were shown as gray indices."""
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    palette[0], palette[1] = 0, 255  # black and white present: the DICOM stretch changes nothing
    indices = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    indices[0, 0], indices[0, 1] = 0, 1
    ds = dicom_dataset(ExplicitVRLittleEndian)
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for at, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", (palette[:, at].astype("<u2") * 257).tobytes())
    ds.PixelData = indices.tobytes()
    ds.save_as(tmp_path / "p.dcm", enforce_file_format=True)
    luma = np.asarray(Image.fromarray(palette[indices]).convert("L")).astype(int)
    assert np.abs(read_dicom(tmp_path / "p.dcm", 64).astype(int) - luma).max() <= 1


@pytest.mark.reliability
def test_colour_dicom_becomes_gray_by_the_luma_png_gets(tmp_path):
    """RGB DICOM was a plain channel mean and YBR_FULL not its Y (luminance), while the same
    pixels as PNG get PIL's ITU-R 601-2 luma: one study gave three different grays."""
    from pydicom.pixels import convert_color_space

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1] = 0, 255  # black and white present: the DICOM stretch changes nothing
    Image.fromarray(rgb).save(tmp_path / "c.png")
    luma = read_radiograph(tmp_path / "c.png", 64)
    assert np.array_equal(luma, np.asarray(Image.fromarray(rgb).convert("L")))
    assert np.array_equal(read_radiograph(write_colour_dicom(tmp_path / "rgb.dcm", rgb), 64), luma)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    gray = read_radiograph(write_colour_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"), 64).astype(int)
    assert np.abs(gray - ybr[..., 0]).max() <= 2  # Y, within the rounding of pydicom's YBR -> RGB


@pytest.mark.reliability
@pytest.mark.parametrize("case", ["png_constant", "png_black", "dicom_constant", "dicom_slope_zero"])
def test_a_uniform_image_is_refused_naming_the_file(case, tmp_path, model_dir, capsys):
    """A constant image, or a DICOM whose rescale slope is 0, became an all-zero image and
    generate printed a confident report with exit 0."""
    import pydicom

    if case.startswith("png"):
        path = tmp_path / "flat.png"
        Image.new("L", (100, 120), 0 if case == "png_black" else 140).save(path)
    else:
        pixels = np.full((120, 100), 700) if case == "dicom_constant" else _chest().astype(np.uint16) * 16
        path = write_dicom(tmp_path / "flat.dcm", pixels)
        if case == "dicom_slope_zero":
            ds = pydicom.dcmread(path)
            ds.RescaleSlope, ds.RescaleIntercept = "0", "5"
            ds.save_as(path)
    with pytest.raises(ImageError, match=f"{path.name} is uniform: every pixel is"):
        read_radiograph(path, 64)
    assert main(["generate", "--model", str(model_dir), str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{path.name} is uniform" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("case, message", [
    ("directory", "is a directory, not an image file"), ("fifo", "is not a regular file"),
    ("missing", "does not exist"),
])
def test_a_folder_or_fifo_is_named_as_what_it_is(case, message, tmp_path, model_dir, capsys):
    """A folder or a FIFO given to generate was reported as "does not exist"."""
    import os

    path = tmp_path / "input.png"
    if case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)
    with pytest.raises(ImageError, match=f"image {path} {message}"):
        read_radiograph(path, 64)
    assert main(["generate", "--model", str(model_dir), str(path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("flag, value", [("--beams", "0"), ("--beams", "-1"), ("--max-new-tokens", "0")])
def test_a_decoding_setting_below_one_is_named(flag, value, model_dir, tmp_path, capsys):
    """--beams 0 ended in a ZeroDivisionError traceback, --beams -1 in "negative dimension"."""
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(model_dir), str(tmp_path / "f.png"), flag, value]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: {flag} must be at least 1, got {value}"]


@pytest.mark.reliability
@pytest.mark.parametrize("flag, value, message", [
    ("--length-penalty", "nan", "--length-penalty must be a finite number, got nan"),
    ("--beams", "3000000", "--beams must be at most 64, got 3000000"),
    ("--max-new-tokens", "100000000", "--max-new-tokens must be at most 8192, got 100000000")])
def test_a_decoding_flag_out_of_range_is_named(flag, value, message, model_dir, tmp_path, capsys):
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(model_dir), str(tmp_path / "f.png"), flag, value]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


@pytest.mark.reliability
@pytest.mark.parametrize("where", ["run_config.json", "README.md"])
@pytest.mark.parametrize("key, value, message", [
    ("num_beams", 0, "num_beams must be at least 1, got 0"),
    ("num_beams", -1, "num_beams must be at least 1, got -1"),
    ("num_beams", "3", "num_beams must be an integer, got str '3'"),
    ("num_beams", 1000, "num_beams must be at most 64, got 1000"),
    ("length_penalty", float("nan"), "length_penalty must be a finite number, got nan"),
    ("max_new_tokens", True, "max_new_tokens must be an integer, got bool True")])
def test_decoding_settings_saved_with_a_model_are_checked(where, key, value, message, model_dir, tmp_path,
                                                           capsys):
    """num_beams 0 in run_config.json or the model card ended in a ZeroDivisionError traceback,
    -1 in "negative dimension", "3" in a TypeError; NaN length_penalty was used."""
    import shutil

    from medexgen_lib.config import load_config
    from medexgen_lib.model_card import build_card, export_facts

    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    settings = {"num_beams": 2, "max_new_tokens": 7, "length_penalty": 0.5, key: value}
    if where == "run_config.json":
        (saved / "run_config.json").write_text(json.dumps({"eval": settings}))
    else:
        facts = export_facts(load_config("demo"), ReportGenerator.from_pretrained(model_dir),
                             {"epoch": 1, "selection_metric": "clinical macro_F1", "selection_value": 0.5,
                              "fingerprint": "f", "val": {}}, {})
        facts["results"]["test"] = {"n": 1, "model": {}, "baselines": {}, "decode": settings}
        (saved / "README.md").write_text(str(build_card(facts)))
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(saved), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(saved / where) in error[0] and error[0].endswith(message), error


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["link to /dev/zero", "FIFO"])
def test_a_run_config_that_is_not_a_regular_file_is_refused(kind, model_dir, tmp_path, capsys):
    """run_config.json as a link to /dev/zero ended in a MemoryError; as a FIFO, generate hung."""
    import os
    import shutil

    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    if kind == "FIFO":
        os.mkfifo(saved / "run_config.json")
    else:
        (saved / "run_config.json").symlink_to("/dev/zero")
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(saved), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is not a regular file" in error[0] and str(saved / "run_config.json") in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_an_integer_of_thousands_of_digits_in_a_model_file_is_named(name, model_dir, tmp_path, capsys):
    """Python refuses to read an integer of over 4300 digits: "Exceeds the limit (4300 digits)"
    was printed without naming the file."""
    import shutil

    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    text = (saved / name).read_text()
    (saved / name).write_text(text.replace("{", '{"huge": ' + "9" * 5000 + ", ", 1))
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(saved), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{saved / name} is not valid JSON" in error[0] and "4300" in error[0]


@pytest.mark.reliability
def test_a_model_card_nested_too_deep_is_named_and_left_aside(model_dir, tmp_path, capsys, caplog):
    """A model card nested 3000 levels deep ended generate with "maximum recursion depth
    exceeded", naming no file."""
    import logging
    import shutil

    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    (saved / "README.md").write_text("---\nmedexgen: " + "[" * 3000 + "]" * 3000 + "\n---\n# notes\n")
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    with caplog.at_level(logging.WARNING, logger="medexgen_lib.inference"):
        assert main(["generate", "--model", str(saved), str(tmp_path / "f.png")]) == 0
    assert any(f"model card {saved / 'README.md'} is unreadable" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().out.strip()


@pytest.fixture
def no_decoder_in_memory(monkeypatch):
    """Fails the test where a GPT-2 decoder is built in real memory (not on PyTorch's meta device):
    a tampered config.json must be refused before its layers are allocated."""
    import medexgen_lib.model as model_module

    real = model_module.GPT2LMHeadModel

    def guarded(config):
        if torch.empty(0).device.type != "meta":
            pytest.fail(f"a decoder of {config.n_layer} layers x {config.n_embd} was built in memory "
                        "before config.json was checked")
        return real(config)
    monkeypatch.setattr(model_module, "GPT2LMHeadModel", guarded)


def _tampered(model_dir, tmp_path, **changes):
    import shutil

    hostile = tmp_path / "model"
    shutil.copytree(model_dir, hostile)
    config = json.loads((hostile / "config.json").read_text())
    (hostile / "config.json").write_text(json.dumps({**config, **changes}))
    return hostile


@pytest.mark.reliability
@pytest.mark.parametrize("field, value, bound", [
    ("n_layer", 100_000, "[1, 128]"), ("vocab_size", 2_000_000_000, "[1, 1000000]"),
    ("n_positions", 10**9, "[1, 8192]"), ("n_embd", 1_048_576, "[1, 16384]"),
    ("guidance_pool", 20_000, "[1, 16]"), ("n_views", 10**6, "[2, 8]"),
])
def test_a_model_config_with_huge_sizes_is_refused_before_building(field, value, bound, model_dir, tmp_path,
                                                                  capsys, no_decoder_in_memory):
    """n_layer 100000 used 4.9 GB in 24 s; the others failed in the allocator naming no file."""
    hostile = _tampered(model_dir, tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"config.json: model config field '{field}' must be in "
                                         f"{re.escape(bound)}, got {value}"):
        ReportGenerator.from_pretrained(hostile)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "config.json" in error[0] and f"'{field}'" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("changes, message", [
    ({"n_layer": 3}, r"tensor\(s\) the config needs are not in the weights, e.g. \['decoder.transformer.h.1"),
    ({"vocab_size": 100_000}, r"size mismatch for decoder.(lm_head|transformer.wte).weight: \[\d+, 32\] in "
                              r"the weights, \[100000, 32\] by the config"),
    ({"n_embd": 16384}, "size mismatch for"), ({"n_positions": 8192}, "decoder.transformer.wpe.weight"),
    ({"n_views": 8}, "size mismatch for view_embedding.weight"),
])
def test_a_model_config_that_does_not_match_the_weights_header_is_refused_unbuilt(
        changes, message, model_dir, tmp_path, capsys, no_decoder_in_memory):
    """Within the bounds a tampered config.json can still size layers of many GB (n_embd 16384:
    3 GB per layer); its shapes are checked against the safetensors header before any is built."""
    hostile = _tampered(model_dir, tmp_path, **changes)
    with pytest.raises(ValueError, match=f"weights .*model.safetensors do not fit .*config.json: .*{message}"):
        ReportGenerator.from_pretrained(hostile)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "do not fit" in error[0]


@pytest.mark.reliability
@pytest.mark.parametrize("case", ["dev_zero", "oversized"])
def test_a_model_config_json_that_is_a_device_or_too_large_is_refused_unread(case, model_dir, tmp_path,
                                                                            capsys, monkeypatch):
    """config.json as a link to /dev/zero ended in a MemoryError after 4.4 GB."""
    import medexgen_lib.model as model_module

    hostile = _tampered(model_dir, tmp_path)
    config = hostile / "config.json"
    if case == "dev_zero":
        config.unlink()
        config.symlink_to("/dev/zero")
        message = "config.json is not a regular file"
    else:
        monkeypatch.setattr(model_module, "MAX_CONFIG_BYTES", config.stat().st_size + 10)
        config.write_text(config.read_text() + " " * 20)  # valid JSON, 10 bytes over the cap
        message = f"config.json is over {config.stat().st_size - 10} bytes"
    with pytest.raises(ValueError, match=message):
        ReportGenerator.from_pretrained(hostile)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def _wordpiece_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.WordPiece({"[UNK]": 0, "heart": 1, "normal": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    return other.to_str()


@pytest.mark.reliability
@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"\x00garbage{", "tokenizer.json is not valid JSON"),
    ("tokenizer.json", b'{"a": 1}', "tokenizer.json is not a tokenizer the tokenizers library reads"),
    ("tokenizer.json", b"[1, 2]", "tokenizer.json must hold a JSON object, got list"),
    ("tokenizer.json", "no added_tokens", "tokenizer.json has no 'added_tokens' list"),
    ("tokenizer.json", "wordpiece", "tokenizer.json is not the tokenizer of .*config.json: vocab_size"),
    ("tokenizer.json", "/dev/zero", "tokenizer.json is not a regular file"),
    ("tokenizer_config.json", b"\x00garbage{", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b"[" * 100_000 + b"]" * 100_000, "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json must hold a JSON object"),
    ("tokenizer_config.json", b'{"bos_token": 5}', r"\(tokenizer.json, tokenizer_config.json\) hold a value "
                                                   "transformers cannot use: TypeError"),
])
def test_a_damaged_or_foreign_tokenizer_file_is_named(name, content, message, model_dir, tmp_path, capsys):
    """Another model type's tokenizer.json gave KeyError: 'added_tokens', garbage a JSON error
    naming no file, deep nesting a RecursionError; a WordPiece tokenizer.json loaded silently."""
    hostile = _tampered(model_dir, tmp_path)
    target = hostile / name
    if content == "no added_tokens":
        values = json.loads(target.read_text())
        del values["added_tokens"]
        content = json.dumps(values).encode()
    elif content == "wordpiece":
        content = _wordpiece_tokenizer_json().encode()
    if content == "/dev/zero":
        target.unlink()
        target.symlink_to("/dev/zero")
    else:
        target.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ReportGenerator.from_pretrained(hostile)
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    assert main(["generate", "--model", str(hostile), str(tmp_path / "f.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and (name in error[0] or "tokenizer files in" in error[0])


def test_every_model_size_the_run_config_allows_loads_back():
    """A saved model's bounds are the run config's, so no trained model is refused at load time."""
    from medexgen_lib.config import MAX_TEXT_LENGTH, RANGES
    from medexgen_lib.model import _CONFIG_RANGES

    for key, field in (("model.n_layer", "n_layer"), ("model.n_head", "n_head"), ("model.n_embd", "n_embd"),
                       ("tokenizer.vocab_size", "vocab_size"), ("guidance.pool", "guidance_pool")):
        assert RANGES[key][1] == _CONFIG_RANGES[field][1], key
    assert MAX_TEXT_LENGTH + 100 <= _CONFIG_RANGES["n_positions"][1]  # room for a guidance prompt


@pytest.mark.parametrize("head_side, report, steps", [
    ("left", "Small left pleural effusion.", ["align_sides"]),  # the head's side replaces the decoder's
    ("right", "Small right pleural effusion.", [])])  # the same side: nothing changed, nothing named
def test_generate_json_reports_the_decoder_text_and_what_post_processing_changed(head_side, report, steps,
                                                                               tmp_path, monkeypatch, capsys):
    from medexgen_lib.guidance import ObservationGuidance
    from medexgen_lib.model import ReportGeneratorConfig

    tokenizer = train_tokenizer(["Small right pleural effusion. Heart size normal."] * 20, 300)
    labels = ["Pleural Effusion", "Pleural Effusion, left", "Pleural Effusion, right"]
    model = ReportGenerator(ReportGeneratorConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, encoder="resnet18", image_size=64, n_layer=1, n_head=2, n_embd=16,
        n_positions=64, guidance_labels=labels, guidance_thresholds=[0.5] * 3, guidance_align_sides=True))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "guided")
    decoded = "Small right pleural effusion."
    monkeypatch.setattr(ReportGenerator, "decode", lambda self, ids: [decoded] * len(ids))
    sides = [0.9, 0.8, 0.1] if head_side == "left" else [0.9, 0.1, 0.8]  # effusion, then its sides
    monkeypatch.setattr(ObservationGuidance, "logits", lambda self, features, batch, mask: torch.logit(
        torch.tensor([sides] * batch)))
    frontal = tmp_path / "f.png"
    Image.fromarray(_chest()).save(frontal)
    assert main(["generate", "--model", str(tmp_path / "guided"), str(frontal), "--json",
                 "--max-new-tokens", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["decoder_text"], printed["report"], printed["post_processing"]) == (decoded, report, steps)


def test_generate_help_names_every_field_json_prints(model_dir, tmp_path, capsys):
    """``generate --help`` says what ``--json`` prints: each of its fields by name (it named the
    labeler's observations only, not decoder_text or post_processing)."""
    frontal = tmp_path / "f.png"
    Image.fromarray(_chest()).save(frontal)
    assert main(["generate", "--model", str(model_dir), str(frontal), "--json", "--max-new-tokens", "2"]) == 0
    fields = set(json.loads(capsys.readouterr().out))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert fields and {field for field in fields if field not in shown} == set()


@pytest.mark.parametrize("kind", ["no head", "planning"])
def test_generate_json_on_a_model_without_a_head_and_on_a_planning_one(kind, model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """Without a head nothing edits the decoder's text and no step is named; a planning model whose
    head finds nothing writes its normal report, named as planned."""
    from medexgen_lib.guidance import ObservationGuidance
    from medexgen_lib.model import ReportGeneratorConfig

    decoded, normal = "Heart size normal.", "The heart is normal in size. No pleural effusion."
    monkeypatch.setattr(ReportGenerator, "decode", lambda self, ids: [decoded] * len(ids))
    folder = model_dir
    if kind == "planning":
        tokenizer = train_tokenizer([normal, decoded] * 20, 300)
        labels = ["Cardiomegaly", "Pleural Effusion"]
        model = ReportGenerator(ReportGeneratorConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, encoder="resnet18", image_size=64, n_layer=1, n_head=2,
            n_embd=16, n_positions=64, guidance_labels=labels, guidance_thresholds=[0.5] * 2,
            guidance_align_sides=True, guidance_normal_report=normal))
        model.tokenizer = tokenizer
        folder = tmp_path / "planning"
        model.save_pretrained(folder)
        monkeypatch.setattr(ObservationGuidance, "logits", lambda self, features, batch, mask: torch.full(
            (batch, len(labels)), -5.0))  # nothing found
    frontal = tmp_path / "f.png"
    Image.fromarray(_chest()).save(frontal)
    assert main(["generate", "--model", str(folder), str(frontal), "--json", "--max-new-tokens", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = (decoded, []) if kind == "no head" else (normal, ["plan_report"])
    assert printed["decoder_text"] == decoded
    assert (printed["report"], printed["post_processing"]) == expected


@pytest.mark.reliability
def test_a_damaged_run_config_is_not_read_when_every_decoding_setting_is_given(model_dir, tmp_path, capsys):
    """Every decoding flag on the command line: nothing saved is needed, so a damaged
    run_config.json does not stop generate; with one flag left out it is still named."""
    import shutil

    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    (saved / "run_config.json").write_text("{not json")
    Image.fromarray(_chest()).save(tmp_path / "f.png")
    flags = ["--beams", "2", "--max-new-tokens", "5", "--length-penalty", "1.0", "--no-repeat-ngram-size", "0"]
    assert main(["generate", "--model", str(saved), str(tmp_path / "f.png"), "--json", *flags]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["report"], str)
    assert main(["generate", "--model", str(saved), str(tmp_path / "f.png"), *flags[:-2]]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(saved / "run_config.json") in error[0], error
