"""Shared fixtures: the real IU X-Ray sample in ../shared and a small phantom set."""

from pathlib import Path

import pytest

from medexgen_lib.config import load_config
from medexgen_lib.paths import PROJECT_ROOT
from medexgen_lib.phantom import make_phantom_dataset

SHARED_SAMPLE = PROJECT_ROOT.parent / "shared" / "iuxray-sample"


@pytest.fixture(scope="session")
def iuxray_sample() -> Path:
    """The real sample, read in place; tests using it skip where it is absent."""
    if not (SHARED_SAMPLE / "reports").is_dir():
        pytest.skip(f"real IU X-Ray sample not found at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A 40-study phantom set (read-only for tests)."""
    out = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(40, seed=7, out_dir=out, image_size=64)
    return out


@pytest.fixture
def tmp_config(tmp_path):
    """A config whose data and output folders live in the test's temporary folder."""
    def make(profile="demo", **overrides):
        settings = {"paths.data_dir": str(tmp_path / "data"),
                    "paths.output_dir": str(tmp_path / "output")}
        settings.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(profile, settings)
    return make
