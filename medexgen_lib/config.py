"""One config object describes a run; named profiles are presets of it.

Sections are dataclasses so that a mistyped key fails loudly instead of being
ignored. Overrides use dotted keys (``{"data.n_phantom_studies": 200}``), the
same form the notebooks' ``overrides`` parameter and the runner's ``-p`` take.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medexgen_lib.metrics import REFERENCE_CONVENTIONS, VALIDATION_METRICS
from medexgen_lib.paths import default_root

OPENI_BASE_URL = "https://openi.nlm.nih.gov/imgs/collections"
RESNET_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101")
MAX_IMAGE_SIZE = 4096  # px per side; a saved model's image_size is held to the same bound
# Upper bounds of sizes that allocate memory, shared with a saved model's config.json (model.py):
# reports are a few hundred tokens (GPT-2 has 1024 positions); the head pools a grid of 7x7 at
# 224 px; a phantom radiograph needs a few float arrays of its size squared.
MAX_TEXT_LENGTH = 4096
MAX_POSITIONS = 8192
MAX_GUIDANCE_POOL = 16
# GPT-2 XL has 48 layers, 25 heads, width 1600 and 50,257 tokens; these leave room for larger decoders.
MAX_LAYERS, MAX_HEADS, MAX_EMBD, MAX_VOCAB_SIZE = 128, 256, 16384, 1_000_000
MAX_PHANTOM_IMAGE_SIZE = 2048
DATA_SOURCES = ("phantom", "openi", "folder", "annotation", "mimic")
MAX_BEAMS = 64  # beam search keeps this many decoder states per study; reports use 1-5


class ConfigError(ValueError):
    """A profile, key or value in the configuration is not valid."""


@dataclass
class PathsConfig:
    """Where stage inputs and outputs live (DESIGN.md 'The shape'); ``~`` is the home folder and
    relative folders are made absolute against the current folder when the config is built, so
    every stage (a notebook kernel runs in notebooks/) writes where the caller meant. Defaults: ``paths.default_root``."""

    data_dir: str = field(default_factory=lambda: str(default_root() / "IUXRAY_DATA_PIPELINE"))
    output_dir: str = field(default_factory=lambda: str(default_root() / "IUXRAY_OUTPUT_PIPELINE"))

    def __post_init__(self) -> None:
        for key in ("data_dir", "output_dir"):
            value = getattr(self, key)
            if not value.strip():
                raise ConfigError(f"paths.{key} must name a folder, got {value!r}")
            setattr(self, key, os.path.abspath(os.path.expanduser(value)))

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
    (download the archives, or use local ones given in ``*_archive``),
    ``"folder"`` (already extracted images/reports in ``paths``), ``"annotation"``
    (an R2Gen-format ``annotation.json``, medexgen_lib.annotation) or ``"mimic"``
    (MIMIC-CXR-JPG 2.0.0 with MIMIC-CXR's free-text reports as PhysioNet ships them,
    unpacked in ``paths.data_dir``; medexgen_lib.mimic). Both of the last two carry their
    own train/val/test split, which stage 03 uses.

    ``annotation_file``: the R2Gen ``annotation.json`` (empty: ``<paths.data_dir>/annotation.json``);
    ``image_root``: the folder its ``image_path`` entries are relative to (empty:
    ``<paths.data_dir>/images``, R2Gen's ``data/<name>/images`` beside ``annotation.json``).
    ``projections_csv``: frontal/lateral per image (``uid,filename,projection``); for
    ``annotation`` a ``filename`` is an ``image_path`` entry as the annotation writes it.
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
    # Byte sizes checked on every use of an archive (0: unchecked). Open-i publishes no byte
    # sizes or checksums that could be cited here, so both stay unchecked by default.
    images_size: int = 0
    reports_size: int = 0
    # Refused before extraction: more declared bytes or members than these. Open-i's image
    # archive holds about 7,470 PNGs (about 1.3 GB), its report archive 3,955 XML files.
    archive_max_bytes: int = 2_500_000_000
    archive_max_members: int = 15_000
    download_retries: int = 3
    projections_csv: str = ""
    annotation_file: str = ""
    image_root: str = ""

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError("data.source must be " + ", ".join(map(repr, DATA_SOURCES[:-1]))
                              + f" or {DATA_SOURCES[-1]!r}, got {self.source!r}")


@dataclass
class TextConfig:
    """Report cleaning and the text the model learns to write."""

    target: str = "findings+impression"  # or "findings", "impression"
    lowercase: bool = False
    max_length: int = 128  # tokens, including bos/eos

    def __post_init__(self) -> None:
        if self.target not in ("findings+impression", "findings", "impression"):
            raise ConfigError("text.target must be 'findings+impression', 'findings' or "
                              f"'impression', got {self.target!r}")


@dataclass
class TokenizerConfig:
    """``kind``: ``gpt2`` (GPT-2's BPE, from a local dir or the hub cache),
    ``trained`` (byte-level BPE trained on the training split), or ``auto``
    (GPT-2's where its files can be had, else trained)."""

    kind: str = "auto"
    gpt2_source: str = "gpt2"  # hub name or local folder with GPT-2's tokenizer files
    vocab_size: int = 4000  # for the trained tokenizer

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "gpt2", "trained"):
            raise ConfigError(f"tokenizer.kind must be 'auto', 'gpt2' or 'trained', got {self.kind!r}")


@dataclass
class SplitConfig:
    """Study-level train/val/test split, or an external R2Gen ``annotation.json``."""

    val_fraction: float = 0.1
    test_fraction: float = 0.2
    annotation_file: str = ""
    require_findings: bool = False  # keep only studies with a FINDINGS section

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"split.val_fraction ({self.val_fraction}) + split.test_fraction "
                              f"({self.test_fraction}) must leave some training data (sum < 1)")


@dataclass
class ImagesConfig:
    """How radiographs become model input."""

    size: int = 224
    missing_view: str = "duplicate"  # "duplicate" the other view, "blank", or "drop" the study
    bad_image: str = "stop"  # "stop" at a corrupt image, or "skip" it and count
    max_pixels: int = 60_000_000  # larger images are refused as decompression bombs
    augment: bool = True  # small affine + contrast jitter at train time; never a left/right flip

    def __post_init__(self) -> None:
        if self.missing_view not in ("duplicate", "blank", "drop"):
            raise ConfigError("images.missing_view must be 'duplicate', 'blank' or 'drop', "
                              f"got {self.missing_view!r}")
        if self.bad_image not in ("stop", "skip"):
            raise ConfigError(f"images.bad_image must be 'stop' or 'skip', got {self.bad_image!r}")
        if self.size < 32 or self.size % 32 or self.size > MAX_IMAGE_SIZE:
            raise ConfigError(f"images.size must be a multiple of 32 from 32 to {MAX_IMAGE_SIZE}, "
                              f"got {self.size}")


@dataclass
class ModelConfig:
    """ResNet encoder -> linear -> GPT-2 decoder; sizes used when not pretrained."""

    encoder: str = "resnet50"
    encoder_pretrained: bool = True
    encoder_weights: str = ""  # a torchvision state-dict file; empty: torchvision's cache/hub
    decoder_pretrained: bool = True
    decoder_source: str = "gpt2"  # hub name or local folder (save_pretrained) of a GPT-2
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder not in RESNET_ENCODERS:
            raise ConfigError(f"model.encoder must be a torchvision ResNet name, got {self.encoder!r}")
        if not self.decoder_pretrained and self.n_head > 0 and self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head "
                              f"({self.n_head})")


@dataclass
class TrainConfig:
    """The training loop (medexgen_lib.train)."""

    epochs: int = 30
    batch_size: int = 16
    grad_accum: int = 1
    lr_encoder: float = 5e-5
    lr_decoder: float = 5e-5
    lr_new: float = 5e-4  # projection, view/grid embeddings, token embeddings new to the decoder
    weight_decay: float = 0.01
    scheduler: str = "cosine"  # "cosine" or "linear" (after warmup), or "plateau"
    warmup_ratio: float = 0.05
    clip_grad_norm: float = 1.0
    precision: str = "auto"  # "auto": bf16 where the GPU supports it, else fp16; off on CPU
    patience: int = 5  # epochs without improvement of selection_metric before stopping
    selection_metric: str = "clinical macro_F1"
    num_workers: int = 0
    shuffle_images: bool = False  # control experiment: images permuted against reports
    # Encoder BatchNorm in eval mode while training: running statistics instead of the batch's
    # (small batches, a pretrained encoder; makes grad_accum x batch equal one larger batch).
    freeze_batchnorm: bool = False
    # Epochs the encoder trains; later epochs train the rest only on its cached features (cheap:
    # no backward through the ResNet). 0: the encoder trains in every epoch.
    encoder_epochs: int = 0
    # After encoder_epochs the observation head goes on learning from the cached features
    # (False) or freezes with the encoder (True, the first frozen design; kept for the ablation).
    freeze_head: bool = False
    # Exported to models/final: "best", the epoch with the best selection_metric on val, or
    # "last", the last epoch trained (its thresholds still chosen on val at that epoch).
    export: str = "best"
    # "new": cross-attention layers train at lr_new (they are new even in a pretrained GPT-2);
    # "decoder": the seed design's grouping, kept to reproduce the ablation's reference row.
    cross_attention_lr: str = "new"
    label_smoothing: float = 0.0  # of the LM loss (0: plain cross-entropy)
    # Live curves: "tensorboard", "none", or another Accelerate tracker that is installed
    # ("mlflow", "wandb", ...); checked when training starts (medexgen_lib.tracking).
    log_with: str = "tensorboard"

    def __post_init__(self) -> None:
        if self.export not in ("best", "last"):
            raise ConfigError(f"train.export must be 'best' or 'last', got {self.export!r}")
        if self.cross_attention_lr not in ("new", "decoder"):
            raise ConfigError("train.cross_attention_lr must be 'new' or 'decoder', "
                              f"got {self.cross_attention_lr!r}")
        if self.scheduler not in ("cosine", "linear", "plateau"):
            raise ConfigError(f"train.scheduler must be 'cosine', 'linear' or 'plateau', got {self.scheduler!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.precision!r}")
        unknown = [name.strip() for name in self.selection_metric.split(" + ")
                   if name.strip() not in VALIDATION_METRICS]
        if unknown:  # found now, not after an epoch of training
            raise ConfigError(f"train.selection_metric {self.selection_metric!r} names {unknown}, not a "
                              f"validation metric; known: {', '.join(VALIDATION_METRICS)} (several joined by ' + ')")


@dataclass
class GuidanceConfig:
    """Clinical guidance (medexgen_lib.guidance): an observation head on the image features,
    trained on the labeler's labels of the training reports, optionally feeding the decoder."""

    head: bool = False  # auxiliary observation head, BCE added to the LM loss
    decoder: bool = False  # predicted observations fed to the decoder as extra tokens (needs head)
    embedding: bool = False  # ... and added to every input token embedding (needs head)
    prompt: bool = False  # ... and as tokens the decoder's input starts with (needs head)
    decoder_input: str = "predicted"  # at training time: "predicted" (detached) or "true" labels
    loss_weight: float = 1.0
    min_count: int = 5  # observations positive in fewer training reports get no label
    pool: int = 2  # pooled grid per view the head sees (2: left/right halves apart)
    # the side word of each generated sentence with one sided finding set to the head's side
    # (guidance.align_sides; needs head): where the decoder does not follow the prompt's side
    align_sides: bool = False
    # each finding the head predicts and the report does not state gets the training reports'
    # most frequent sentence stating it on the head's side (guidance.state_findings; needs head)
    state_findings: bool = False
    # labels whose val AUROC is below this are never predicted (guidance.choose_thresholds)
    min_auroc: float = 0.0
    # each report planned around the training reports' usual normal report, the head's findings in
    # place of the normal sentences they contradict (planning.plan_report; needs head)
    plan_reports: bool = False

    def __post_init__(self) -> None:
        if self.decoder_input not in ("predicted", "true"):
            raise ConfigError("guidance.decoder_input must be 'predicted' or 'true', "
                              f"got {self.decoder_input!r}")
        if self.align_sides and not self.head:
            raise ConfigError("guidance.align_sides needs guidance.head (its sides are the head's)")
        if self.state_findings and not self.head:
            raise ConfigError("guidance.state_findings needs guidance.head (its findings are the head's)")
        if self.plan_reports and not self.head:
            raise ConfigError("guidance.plan_reports needs guidance.head (its findings are the head's)")
        if self.plan_reports and self.state_findings:
            raise ConfigError("guidance.plan_reports and guidance.state_findings both state the head's "
                              "findings; choose one")
        if (self.decoder or self.embedding or self.prompt) and not self.head:
            raise ConfigError("guidance.decoder, guidance.embedding and guidance.prompt need guidance.head "
                              "(the decoder is fed its predictions)")


@dataclass
class EvalConfig:
    """Decoding and scoring, for validation during training and for evaluation."""

    num_beams: int = 3
    max_new_tokens: int = 100
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    batch_size: int = 32
    meteor: bool = True  # where Java is installed; recorded as skipped otherwise
    uncertain_as_positive: bool = False
    # "full": whole cleaned references; "r2gen": R2Gen's convention (references cut to 60
    # tokens of its tokenizer, words seen < 3 times in training as <unk>), see metrics.py;
    # "r2gen-mimic": R2Gen's MIMIC-CXR settings (100 tokens, words seen < 10 times as <unk>)
    references: str = "full"

    def __post_init__(self) -> None:
        if self.references not in REFERENCE_CONVENTIONS:
            raise ConfigError("eval.references must be " + " or ".join(map(repr, REFERENCE_CONVENTIONS))
                              + f", got {self.references!r}")


@dataclass
class Config:
    """Everything a run needs; later stages add their own sections."""

    profile: str = "demo"
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON next to an artifact (atomically)."""
        from medexgen_lib.files import write_json

        return write_json(path, self.to_dict())


# Allowed range (inclusive; None: open) of every numeric setting, checked by load_config
# so that a bad value is named at once rather than failing deep inside a stage.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**32 - 1), "data.n_phantom_studies": (1, None),
    "data.phantom_image_size": (32, MAX_PHANTOM_IMAGE_SIZE),
    "data.download_retries": (0, None), "data.images_size": (0, None), "data.reports_size": (0, None),
    "data.archive_max_bytes": (1, None), "data.archive_max_members": (1, None),
    "text.max_length": (8, MAX_TEXT_LENGTH), "tokenizer.vocab_size": (256, MAX_VOCAB_SIZE),
    "split.val_fraction": (0, 1), "split.test_fraction": (0, 1), "images.max_pixels": (1, None),
    "model.n_layer": (1, MAX_LAYERS), "model.n_head": (1, MAX_HEADS), "model.n_embd": (1, MAX_EMBD),
    "model.dropout": (0, 1), "train.epochs": (1, None), "train.batch_size": (1, None),
    "train.grad_accum": (1, None), "train.lr_encoder": (0, None), "train.lr_decoder": (0, None),
    "train.lr_new": (0, None), "train.weight_decay": (0, None), "train.warmup_ratio": (0, 1),
    "train.clip_grad_norm": (0, None), "train.patience": (1, None), "train.encoder_epochs": (0, None), "train.num_workers": (0, None),
    "eval.num_beams": (1, MAX_BEAMS), "eval.max_new_tokens": (1, MAX_POSITIONS),
    "eval.no_repeat_ngram_size": (0, None), "eval.batch_size": (1, None),
    "train.label_smoothing": (0, 1), "guidance.loss_weight": (0, None), "guidance.min_count": (1, None),
    "guidance.pool": (1, MAX_GUIDANCE_POOL), "guidance.min_auroc": (0, 1),
}


PROFILES: dict[str, dict[str, Any]] = {
    # phantom data, small random-init model on 64 px; rationale: docs/RESULTS.md#demo-defaults
    "demo": {"data.source": "phantom", "data.n_phantom_studies": 800,
             "split.val_fraction": 0.0625, "split.test_fraction": 0.5,
             "tokenizer.kind": "trained", "text.max_length": 96, "images.size": 64,
             "images.augment": False,
             "model.encoder": "resnet18", "model.encoder_pretrained": False,
             "model.decoder_pretrained": False, "model.n_layer": 2, "model.n_head": 4,
             "model.n_embd": 128, "model.dropout": 0.1, "train.epochs": 15, "train.batch_size": 8,
             "train.encoder_epochs": 5, "train.selection_metric": "clinical macro_F1 + BLEU-4",
             "train.export": "last",
             "train.lr_encoder": 1e-3, "train.lr_decoder": 1e-3, "train.lr_new": 1e-3,
             "train.patience": 8, "guidance.head": True, "guidance.embedding": True,
             "guidance.prompt": True, "guidance.decoder_input": "true", "guidance.align_sides": True,
             "guidance.pool": 3, "guidance.state_findings": True,
             "eval.num_beams": 1, "eval.max_new_tokens": 80, "eval.meteor": False},
    # real Open-i data, pretrained ResNet50 + GPT-2, planned reports; rationale: docs/RESULTS.md#full-defaults
    "full": {"data.source": "openi", "tokenizer.kind": "gpt2", "split.require_findings": True,
             "text.target": "findings", "guidance.head": True, "guidance.prompt": True,
             "guidance.decoder_input": "true", "guidance.min_count": 20,
             "train.selection_metric": "clinical macro_F1 + BLEU-4",
             "guidance.min_auroc": 0.75, "guidance.plan_reports": True, "guidance.align_sides": True},
    # MIMIC-CXR-JPG with full's model and guidance; rationale: docs/RESULTS.md#mimic-defaults
    "mimic": {"data.source": "mimic", "text.max_length": 100, "eval.max_new_tokens": 100,
              "eval.references": "r2gen-mimic"},
}
PROFILES["mimic"] = {**PROFILES["full"], **PROFILES["mimic"]}  # full's settings under mimic's own


def load_config(profile: str = "demo", overrides: dict[str, Any] | None = None) -> Config:
    """Build the config for ``profile`` with dotted-key ``overrides`` applied."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    settings = {**PROFILES[profile], **(overrides or {})}
    cfg = Config(profile=profile)
    for key, value in settings.items():
        _set_dotted(cfg, key, value)
    _check_finite(cfg)
    # Re-run each section's validation now that the values are in place.
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "__post_init__"):
            value.__post_init__()
    for key, (low, high) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"config key {key!r} must be {allowed}, got {value!r}")
    return cfg


def _check_finite(section: Any, prefix: str = "") -> None:
    """Refuse NaN and infinity in every float field of every section (``"1e400"`` parses to
    infinity; NaN passes any range check, as every comparison with it is false)."""
    for fld in dataclasses.fields(section):
        value, key = getattr(section, fld.name), f"{prefix}{fld.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")


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
