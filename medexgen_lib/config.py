"""One config object describes a run; named profiles are presets of it.

Sections are dataclasses so that a mistyped key fails loudly instead of being
ignored. Overrides use dotted keys (``{"data.n_phantom_studies": 200}``), the
same form the notebooks' ``overrides`` parameter and the runner's ``-p`` take.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medexgen_lib.paths import PROJECT_ROOT

OPENI_BASE_URL = "https://openi.nlm.nih.gov/imgs/collections"


class ConfigError(ValueError):
    """A profile, key or value in the configuration is not valid."""


@dataclass
class PathsConfig:
    """Where stage inputs and outputs live (DESIGN.md 'The shape')."""

    data_dir: str = str(PROJECT_ROOT / "IUXRAY_DATA_PIPELINE")
    output_dir: str = str(PROJECT_ROOT / "IUXRAY_OUTPUT_PIPELINE")

    @property
    def images(self) -> Path:
        return Path(self.data_dir) / "images"

    @property
    def reports(self) -> Path:
        return Path(self.data_dir) / "reports"

    @property
    def temp(self) -> Path:
        return Path(self.data_dir) / "temp"

    @property
    def processed(self) -> Path:
        return Path(self.data_dir) / "processed"

    @property
    def studies_table(self) -> Path:
        return self.processed / "studies.parquet"

    @property
    def checkpoints(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def plots(self) -> Path:
        return Path(self.output_dir) / "plots"

    @property
    def logs(self) -> Path:
        return Path(self.output_dir) / "logs"

    @property
    def models(self) -> Path:
        return Path(self.output_dir) / "models"

    def make_dirs(self) -> None:
        """Create every stage folder (they are empty in a fresh clone)."""
        for path in (self.images, self.reports, self.temp, self.processed,
                     self.checkpoints, self.plots, self.logs, self.models):
            path.mkdir(parents=True, exist_ok=True)


@dataclass
class DataConfig:
    """Which data set the run uses and how to obtain it.

    ``source``: ``"phantom"`` (offline default, generated), ``"openi"``
    (download the archives, or use local ones given in ``*_archive``), or
    ``"folder"`` (already extracted images/reports in ``paths``).
    """

    source: str = "phantom"
    n_phantom_studies: int = 500
    phantom_seed: int = 0
    phantom_image_size: int = 128
    images_url: str = f"{OPENI_BASE_URL}/NLMCXR_png.tgz"
    reports_url: str = f"{OPENI_BASE_URL}/NLMCXR_reports.tgz"
    images_archive: str = ""
    reports_archive: str = ""
    images_sha256: str = ""
    reports_sha256: str = ""
    images_size: int = 0
    reports_size: int = 0
    download_retries: int = 3
    projections_csv: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("phantom", "openi", "folder"):
            raise ConfigError(
                f"data.source must be 'phantom', 'openi' or 'folder', got {self.source!r}")


@dataclass
class Config:
    """Everything a run needs; later stages add their own sections."""

    profile: str = "demo"
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON next to an artifact (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path


PROFILES: dict[str, dict[str, Any]] = {
    "demo": {"data.source": "phantom", "data.n_phantom_studies": 500},
    "full": {"data.source": "openi"},
}


def load_config(profile: str = "demo", overrides: dict[str, Any] | None = None) -> Config:
    """Build the config for ``profile`` with dotted-key ``overrides`` applied."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    settings = {**PROFILES[profile], **(overrides or {})}
    cfg = Config(profile=profile)
    for key, value in settings.items():
        _set_dotted(cfg, key, value)
    # Re-run each section's validation now that the values are in place.
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "__post_init__"):
            value.__post_init__()
    return cfg


def _set_dotted(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(target)}
        if part not in names:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(
                f"unknown config key {key!r}: {where} has no field {part!r} "
                f"(known: {', '.join(sorted(names))})")
        if i == len(parts) - 1:
            setattr(target, part, _coerce(key, names[part], getattr(target, part), value))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"config key {key!r}: {part!r} is a value, not a section")


def _coerce(key: str, fld: dataclasses.Field, current: Any, value: Any) -> Any:
    """Convert command-line strings to the field's type; refuse wrong types."""
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {key!r} is a section; set its fields instead")
    kind = type(current)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            if kind is bool:
                if value.lower() in ("1", "true", "yes"):
                    return True
                if value.lower() in ("0", "false", "no"):
                    return False
                raise ValueError(value)
            if kind in (int, float):
                return kind(value)
        except ValueError:
            raise ConfigError(
                f"config key {key!r} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(
        f"config key {key!r} expects {kind.__name__}, got {type(value).__name__} {value!r}")
