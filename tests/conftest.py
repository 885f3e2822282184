"""Shared fixtures: the real IU X-Ray sample (tests/data), a small phantom set, a full disk,
five small grey PNGs."""

import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medexgen_lib.config import load_config
from medexgen_lib.phantom import make_phantom_dataset

IUXRAY_SAMPLE = Path(__file__).parent / "data" / "iuxray-sample"


@pytest.fixture(scope="session")
def iuxray_sample() -> Path:
    """The real sample, an unmodified copy of the project's shared sample kept in the repository
    (README with the CC BY-NC-ND 4.0 attribution included), so every test runs on any clone."""
    return IUXRAY_SAMPLE


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A 40-study phantom set (read-only for tests)."""
    out = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(40, seed=7, out_dir=out, image_size=64)
    return out


@pytest.fixture
def image_files(tmp_path):
    """Five grey PNGs of slightly different sizes, as (image id, path) pairs."""
    rng = np.random.default_rng(0)
    files = []
    for k in range(5):
        path = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (60 + k, 50), dtype=np.uint8)).save(path)
        files.append((f"IM{k}", str(path)))
    return files


@pytest.fixture
def full_disk():
    """``full_disk(limit)``: a ``preexec_fn`` for a child process whose writes past
    ``limit`` bytes per file fail with EFBIG, as they would on a disk filling up."""
    def limited_to(limit: int):
        def apply():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return apply
    return limited_to


# Tests with a few dozen studies keep a 10% / 20% val / test split: the demo's 6% / 50% (800
# studies) would leave them one or two val studies, or none.
SMALL_DATA_SPLIT = {"split.val_fraction": 0.1, "split.test_fraction": 0.2}


@pytest.fixture
def tmp_config(tmp_path):
    """A config whose data and output folders live in the test's temporary folder."""
    def make(profile="demo", **overrides):
        settings = {"paths.data_dir": str(tmp_path / "data"),
                    "paths.output_dir": str(tmp_path / "output"),
                    **SMALL_DATA_SPLIT}
        settings.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(profile, settings)
    return make


# A 30-study run of a 1-layer model: the training-loop tests' shared settings.
TINY = {"data.n_phantom_studies": 30, "data.phantom_image_size": 48, "images.size": 32,
        **SMALL_DATA_SPLIT,
        "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "train.epochs": 2,
        "train.batch_size": 8, "train.patience": 5, "eval.max_new_tokens": 8,
        "tokenizer.vocab_size": 400, "text.max_length": 48}


TINY_TRAINED = {"data.n_phantom_studies": 40, "data.phantom_image_size": 48, "images.size": 64,
                **SMALL_DATA_SPLIT,
                "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "train.epochs": 2,
                "train.batch_size": 8, "eval.max_new_tokens": 20, "tokenizer.vocab_size": 400,
                "text.max_length": 64, "eval.meteor": False}


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny model trained 2 epochs on 40 phantom studies and evaluated: cfg, model, test data, rows."""
    from medexgen_lib.acquisition import acquire, build_studies_table
    from medexgen_lib.evaluate import run_evaluation
    from medexgen_lib.model import ReportGenerator
    from medexgen_lib.preprocess import load_split, run_preprocessing
    from medexgen_lib.train import train
    from medexgen_lib.visualize import load_predictions

    root = tmp_path_factory.mktemp("viz")
    cfg = load_config("demo", {**TINY_TRAINED, "paths.data_dir": str(root / "data"),
                               "paths.output_dir": str(root / "out")})
    build_studies_table(cfg, acquire(cfg))
    run_preprocessing(cfg)
    train(cfg, progress=False)
    run_evaluation(cfg, progress=False)
    model = ReportGenerator.from_pretrained(cfg.paths.models / "final").eval()
    return cfg, model, load_split(cfg, "test"), load_predictions(cfg.paths.logs)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A stand-in for a pretrained GPT-2 folder (tokenizer + weights via save_pretrained),
    so the pretrained-decoder path runs offline: a byte-level BPE and a 1-layer GPT-2 of its size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from medexgen_lib.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_gpt2")
    texts = ["Heart size is normal. No pleural effusion or pneumothorax.",
             "Small left pleural effusion. Mild cardiomegaly.", "The lungs are clear."] * 30
    tokenizer = train_tokenizer(texts, vocab_size=320)
    tokenizer.save_pretrained(out)
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=32,
                               n_layer=1, n_head=2)).save_pretrained(out)
    return out
