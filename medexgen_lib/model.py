"""ReportGenerator: torchvision ResNet -> one linear projection -> GPT-2 with cross-attention.

Each view (frontal, lateral) becomes a grid of visual tokens (7x7 at 224 px for
ResNet50); tokens get a learned grid-position and view embedding after the
projection to the decoder width, and the views' tokens are concatenated. The
decoder is a stock ``GPT2LMHeadModel(add_cross_attention=True)``, so
``generate()`` (greedy, beam, KV cache) is transformers' own.
Saved as transformers does it: ``config.json``, ``model.safetensors`` and the
tokenizer files in one folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from medexgen_lib import guidance, planning, report_edits
from medexgen_lib.config import (MAX_EMBD, MAX_GUIDANCE_POOL, MAX_HEADS, MAX_IMAGE_SIZE, MAX_LAYERS,
                                  MAX_POSITIONS, MAX_VOCAB_SIZE)
from medexgen_lib.files import honour_umask, read_capped, recover_dir, replace_dir
from medexgen_lib.guidance import ObservationGuidance, observation_loss

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
ENCODER_STRIDE = 32  # a ResNet's grid is image_size / 32 per side
# Allowed (low, high) of config.json's numbers, checked before any layer is built: a zero
# count or an image below one encoder cell cannot run, NaN dropout passes torch's own check, and
# the upper bounds (the run config's, where it has the setting) keep a tampered file from sizing
# layers of terabytes. A study has two views (frontal, lateral); a few more are allowed.
_CONFIG_RANGES = {"vocab_size": (1, MAX_VOCAB_SIZE), "n_layer": (1, MAX_LAYERS), "n_head": (1, MAX_HEADS),
                  "n_embd": (1, MAX_EMBD), "n_positions": (1, MAX_POSITIONS), "n_views": (2, 8),
                  "image_size": (ENCODER_STRIDE, MAX_IMAGE_SIZE), "dropout": (0.0, 1.0),
                  "guidance_pool": (1, MAX_GUIDANCE_POOL)}
MAX_CONFIG_BYTES = 16 * 2**20  # config.json is a few kB (a sentence bank adds some)
# A model's guidance labels are the observations and their sides (a few dozen): a bound checked
# before any list is walked, so a tampered config.json cannot make the checks themselves hang.
MAX_GUIDANCE_LABELS = 1000
MAX_LABEL_WORD_IDS = 64  # a label's words ("left pleural effusion"): one token per byte at worst, as a small tokenizer may split them
# Parameter names of the decoder's cross-attention layers: new even in a pretrained GPT-2.
CROSS_ATTENTION_PARTS = ("crossattention", "ln_cross_attn")


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says how to provide them."""


@dataclass
class ReportGeneratorConfig:
    """Everything needed to rebuild the architecture (weights come from the safetensors file)."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    encoder: str = "resnet50"
    image_size: int = 224
    n_views: int = 2
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    dropout: float = 0.1
    pretrained_vocab_size: int = 0  # token rows that came with a pretrained GPT-2; the rest are new
    encoder_init: str = "random"  # provenance: "random", "imagenet:<source>"
    decoder_init: str = "random"  # provenance: "random", "pretrained:<source>"
    guidance_labels: list[str] = field(default_factory=list)  # observation head's labels; empty: none
    guidance_tokens: bool = False  # predicted labels fed to the decoder as extra tokens
    guidance_pool: int = 2  # the head's pooled grid per view (2: left/right halves kept apart)
    guidance_embedding: bool = False  # predicted labels also added to every input token embedding
    guidance_hard: bool = False  # feed thresholded (0/1) predictions, as a decoder trained on true labels saw
    guidance_prompt: bool = False  # label tokens prepended to the decoder's input (self-attention)
    guidance_thresholds: list[float] = field(default_factory=list)  # per label, chosen on val; empty: 0.5
    guidance_word_ids: list[list[int]] = field(default_factory=list)  # per label, its words' token ids (prompt)
    # post-processing (medexgen_lib.postprocess): side words set to the head's sides (align_sides)
    guidance_align_sides: bool = False
    # bank_key -> the training reports' sentence stating that finding (report_edits.sentence_bank);
    # non-empty: each finding the head predicts is stated in the report (report_edits.state_findings)
    guidance_sentences: dict[str, str] = field(default_factory=dict)
    # sentences only training reports without a finding contain: dropped where one is stated
    guidance_normal_sentences: list[str] = field(default_factory=list)
    # non-empty: reports are planned around this normal report (planning.plan_report, with the bank)
    guidance_normal_report: str = ""

    @property
    def grid_size(self) -> int:
        return self.image_size // ENCODER_STRIDE

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> ReportGeneratorConfig:
        """The config from ``config.json``'s values, each checked before torchvision sees it:
        an unknown or missing key, a value of the wrong type or outside ``_CONFIG_RANGES`` (NaN
        included), ``n_embd`` not a multiple of ``n_head``, a token id outside the vocabulary, or an
        encoder that is not one of the allowed ResNets raises ``ValueError`` naming ``source`` and
        the field."""
        from medexgen_lib.config import RESNET_ENCODERS

        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected an object of model settings, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown model config key(s) {unknown}")
        kinds = {"int": int, "float": float, "str": str, "bool": bool}
        for name, fld in fields.items():
            if name not in values:
                if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{source}: model config field {name!r} is missing")
                continue
            value, kind = values[name], kinds.get(str(fld.type))
            if kind is None:
                continue
            fits = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if kind is bool:
                if not fits:
                    raise ValueError(f"{source}: model config field {name!r} must be true or false, "
                                     f"got {type(value).__name__} {value!r}")
                continue
            if not fits or isinstance(value, bool):
                raise ValueError(f"{source}: model config field {name!r} must be {kind.__name__}, "
                                 f"got {type(value).__name__} {value!r}")
            if kind is int and value < 0:
                raise ValueError(f"{source}: model config field {name!r} must not be negative, got {value}")
            low, high = _CONFIG_RANGES.get(name, (None, None))
            if (kind is float and not math.isfinite(value)) or (low is not None and value < low) \
                    or (high is not None and value > high):
                raise ValueError(f"{source}: model config field {name!r} must be in "
                                 f"[{low}, {high if high is not None else 'inf'}], got {value!r}")
        encoder = values.get("encoder", fields["encoder"].default)
        if encoder not in RESNET_ENCODERS:
            raise ValueError(f"{source}: model config field 'encoder' must be one of "
                             f"{', '.join(RESNET_ENCODERS)}, got {encoder!r}")
        config = cls(**values)
        if config.n_embd % config.n_head:
            raise ValueError(f"{source}: model config field 'n_embd' ({config.n_embd}) must be a "
                             f"multiple of 'n_head' ({config.n_head})")
        _check_guidance_fields(config, source)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "pretrained_vocab_size"):
            limit = config.vocab_size if name == "pretrained_vocab_size" else config.vocab_size - 1
            if getattr(config, name) > limit:
                raise ValueError(f"{source}: model config field {name!r} ({getattr(config, name)}) "
                                 f"must be at most {limit} (vocab_size {config.vocab_size})")
        return config


class ReportGenerator(nn.Module):
    """Images of a study in, report tokens out."""

    def __init__(self, config: ReportGeneratorConfig):
        super().__init__()
        self.config = config
        resnet = getattr(torchvision.models, config.encoder)(weights=None)
        self.encoder_dim = resnet.fc.in_features
        self.encoder = nn.Sequential(*list(resnet.children())[:-2])  # no pooling, no classifier
        self.projection = nn.Linear(self.encoder_dim, config.n_embd)
        self.grid_embedding = nn.Parameter(torch.randn(config.grid_size ** 2, config.n_embd) * 0.02)
        self.view_embedding = nn.Embedding(config.n_views, config.n_embd)
        nn.init.normal_(self.view_embedding.weight, std=0.02)
        self.decoder = GPT2LMHeadModel(_gpt2_config(config))
        self.guidance = (ObservationGuidance(config.guidance_labels, self.encoder_dim, config.n_views,
                                             config.n_embd, config.guidance_pool,
                                             config.guidance_tokens or config.guidance_embedding
                                             or config.guidance_prompt)
                         if config.guidance_labels else None)
        self._condition = None  # [B, n_embd] added to token embeddings during a forward/generate
        self._prompt = None  # [B, labels, n_embd] prepended to the decoder's input (guidance_prompt)
        if config.guidance_embedding and config.guidance_labels:
            self.decoder.get_input_embeddings().register_forward_hook(self._add_condition)
        self.tokenizer = None  # attached by from_pretrained when the folder has one

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, model_cfg, tokenizer, image_size: int, max_length: int,
              guidance_labels: list[str] | None = None, guidance_cfg=None,
              train_texts: Sequence[str] = (), val_texts: Sequence[str] = ()) -> ReportGenerator:
        """A new model per the run's ``ModelConfig``; pretrained parts loaded when asked for;
        an observation head for ``guidance_labels`` wired to the decoder as ``guidance_cfg``
        (a ``GuidanceConfig``) says (see ``medexgen_lib.guidance``), with the sentence bank of
        ``train_texts`` (the training reports) where ``guidance_cfg.state_findings`` or
        ``guidance_cfg.plan_reports``, and for the latter the normal report (``planning.normal_report``
        of the training reports, chosen on ``val_texts``)."""
        labels = list(guidance_labels or [])
        wiring = {}
        if labels and guidance_cfg is not None:
            wiring = {"guidance_tokens": guidance_cfg.decoder, "guidance_pool": guidance_cfg.pool,
                      "guidance_align_sides": guidance_cfg.align_sides,
                      "guidance_embedding": guidance_cfg.embedding, "guidance_prompt": guidance_cfg.prompt,
                      "guidance_hard": guidance_cfg.decoder_input == "true"}
            if guidance_cfg.state_findings:
                wiring["guidance_sentences"] = report_edits.sentence_bank(train_texts, labels)
                wiring["guidance_normal_sentences"] = report_edits.normal_sentences(train_texts)
            if guidance_cfg.plan_reports and train_texts:  # (a model built without reports plans nothing)
                wiring["guidance_sentences"] = report_edits.sentence_bank(train_texts, labels)
                wiring["guidance_normal_report"] = planning.normal_report(train_texts, val_texts)
        prompt = len(labels) if wiring.get("guidance_prompt") else 0
        if prompt:  # the prompt's tokens carry each present label's words (PromptMRG-style)
            wiring["guidance_word_ids"] = [tokenizer(" " + guidance.label_words(label),
                                                     add_special_tokens=False)["input_ids"]
                                           for label in labels]
        decoder = None
        if model_cfg.decoder_pretrained:
            decoder = _load_pretrained_gpt2(model_cfg.decoder_source)
            sizes = {"n_layer": decoder.config.n_layer, "n_head": decoder.config.n_head,
                     "n_embd": decoder.config.n_embd, "n_positions": decoder.config.n_positions}
        else:
            sizes = {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head,
                     "n_embd": model_cfg.n_embd, "n_positions": max(max_length + prompt, 64)}
        if max_length + prompt > sizes["n_positions"]:
            raise ValueError(f"text.max_length ({max_length}) + the guidance prompt ({prompt} labels) "
                             f"exceed the decoder's {sizes['n_positions']} positions "
                             f"({model_cfg.decoder_source if decoder is not None else 'model.*'})")
        config = ReportGeneratorConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            encoder=model_cfg.encoder, image_size=image_size, dropout=model_cfg.dropout,
            encoder_init="random", decoder_init="random", guidance_labels=labels, **wiring, **sizes)
        model = cls(config)
        if model_cfg.encoder_pretrained:
            source = _load_pretrained_resnet(model.encoder, model_cfg.encoder, model_cfg.encoder_weights)
            config.encoder_init = f"imagenet:{source}"
        if decoder is not None:
            check_tokenizer_fits_decoder(tokenizer, decoder, model_cfg.decoder_source)
            config.pretrained_vocab_size = decoder.get_input_embeddings().weight.shape[0]
            decoder.resize_token_embeddings(len(tokenizer))
            missing, unexpected = model.decoder.load_state_dict(decoder.state_dict(), strict=False)
            if unexpected or any(not any(part in k for part in CROSS_ATTENTION_PARTS) for k in missing):
                raise PretrainedUnavailable(
                    f"GPT-2 weights from {model_cfg.decoder_source} do not fit: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}")
            config.decoder_init = f"pretrained:{model_cfg.decoder_source}"
        model.tokenizer = tokenizer
        return model

    # ------------------------------------------------------------------ computing

    def encode(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
               features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, V, 3, H, W]`` -> visual tokens ``[B, V*G, n_embd]`` and their mask ``[B, V*G]``
        (``features``: ``image_features`` of these images, computed before).

        The encoder sees only the views ``view_mask`` marks present: a blank stand-in for a
        missing view would otherwise enter BatchNorm's batch statistics in training. Missing
        views get zero features; their tokens are masked out of cross-attention."""
        tokens, mask, _ = self._encode(images, view_mask, features)
        return tokens, mask

    def encoder_states(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                       teacher_labels: torch.Tensor | None = None, features: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the decoder cross-attends to: visual tokens plus, with guidance tokens, one token
        per observation label (from ``teacher_labels`` when given, else the head's detached
        probabilities, thresholded with ``guidance_hard``); their mask; and the head's logits
        (None without a head). With the guidance embedding, also sets the label tokens' mean,
        which the decoder's token embedding hook adds to every input token, and with the guidance
        prompt the label tokens the decoder's input starts with (used by the next forward or
        generate)."""
        tokens, mask, features = self._encode(images, view_mask, features)
        self._condition = self._prompt = None
        if self.guidance is None:
            return tokens, mask, None
        if view_mask is None:
            view_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        logits = self.guidance.logits(features, images.shape[0], view_mask)
        if self.guidance.states is not None:
            if teacher_labels is not None:
                probabilities = teacher_labels
            elif self.config.guidance_hard:
                probabilities = self.predicted_labels(logits.detach())
            else:
                probabilities = logits.detach().sigmoid()
            if self.config.guidance_embedding or self.config.guidance_tokens:
                extra = self.guidance.tokens(probabilities).to(tokens.dtype)
            if self.config.guidance_embedding:
                self._condition = extra.mean(dim=1)
            if self.config.guidance_prompt:
                self._prompt = self.guidance.prompt_tokens(probabilities, self._label_words()).to(tokens.dtype)
            if self.config.guidance_tokens:
                tokens = torch.cat([tokens, extra], dim=1)
                mask = torch.cat([mask, torch.ones(extra.shape[:2], dtype=mask.dtype,
                                                   device=mask.device)], 1)
        return tokens, mask, logits

    def _add_condition(self, module, inputs, embeddings: torch.Tensor) -> torch.Tensor:
        """Forward hook of the token embedding: add the study's guidance vector (beams repeat it)."""
        if self._condition is None:
            return embeddings
        condition = self._condition
        if embeddings.shape[0] != condition.shape[0]:  # beam search: batch * num_beams rows
            condition = condition.repeat_interleave(embeddings.shape[0] // condition.shape[0], dim=0)
        return embeddings + condition.unsqueeze(1).to(embeddings.dtype)

    def predicted_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's logits -> 0/1 labels (``guidance.hard_labels``) at each observation's
        threshold (``guidance_thresholds``, chosen on val by training); a model saved without
        thresholds keeps the rule it was trained for (each label at 0.5)."""
        labels = self.config.guidance_labels
        if not self.config.guidance_thresholds:  # saved before thresholds existed: its own rule
            return (logits > 0).to(logits.dtype)
        return guidance.hard_labels(logits.sigmoid(), self.config.guidance_thresholds, labels)

    def _label_words(self) -> torch.Tensor | None:
        """Each label's words as the mean of their rows of the decoder's token embedding ``[L, D]``."""
        if not self.config.guidance_word_ids:
            return None
        table = self.decoder.get_input_embeddings().weight
        return torch.stack([table[ids].mean(0) for ids in self.config.guidance_word_ids])

    @property
    def prompt_length(self) -> int:
        """Positions the guidance prompt takes before the report's tokens (0 without one)."""
        return len(self.config.guidance_labels) if self.config.guidance_prompt else 0

    def _with_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        """Decoder inputs with the guidance prompt in front: token embeddings (the guidance
        embedding hook fires on them) after the prompt, the mask extended to cover it."""
        embeds = self.decoder.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt = self._prompt.to(embeds.dtype)
        ones = attention_mask.new_ones(prompt.shape[:2])
        return {"inputs_embeds": torch.cat([prompt, embeds], 1),
                "attention_mask": torch.cat([ones, attention_mask], 1)}

    def image_features(self, images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's feature maps ``[B*V, C, h, w]`` of the views ``view_mask`` marks present
        (zeros for the others)."""
        batch, views = images.shape[:2]
        if view_mask is None:
            view_mask = torch.ones(batch, views, dtype=torch.bool, device=images.device)
        present = view_mask.flatten().bool()
        flat = images.flatten(0, 1)
        if present.all():
            return self.encoder(flat)
        seen = self.encoder(flat[present])
        features = seen.new_zeros((batch * views, *seen.shape[1:]))
        features[present] = seen
        return features

    def _encode(self, images: torch.Tensor, view_mask: torch.Tensor | None,
                features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, views = images.shape[:2]
        if view_mask is None:
            view_mask = torch.ones(batch, views, dtype=torch.bool, device=images.device)
        if features is None:
            features = self.image_features(images, view_mask)
        tokens = self.projection(features.flatten(2).transpose(1, 2))  # [B*V, G, D]
        if tokens.shape[1] != self.grid_embedding.shape[0]:
            raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} px give "
                             f"{tokens.shape[1]} visual tokens; the model expects "
                             f"{self.config.image_size} px ({self.grid_embedding.shape[0]} tokens)")
        view_ids = torch.arange(views, device=images.device).repeat(batch)
        tokens = tokens + self.grid_embedding + self.view_embedding(view_ids).unsqueeze(1)
        tokens = tokens.reshape(batch, views * tokens.shape[1], -1)
        mask = view_mask.repeat_interleave(self.grid_embedding.shape[0], dim=1).long()
        return tokens, mask, features

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                view_mask: torch.Tensor | None = None, observation_targets: torch.Tensor | None = None,
                teacher_labels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                **decoder_kwargs):
        """Teacher-forced decoding; returns transformers' output (``loss`` when labels given).
        With an observation head and ``observation_targets``, ``observation_loss`` (the head's
        BCE) is set on the output too; ``teacher_labels`` replace the head's predictions as
        the decoder's guidance (see ``medexgen_lib.guidance``); ``features`` (``image_features``
        of these images, computed before) spare the encoder."""
        visual, visual_mask, logits = self.encoder_states(images, view_mask, teacher_labels, features)
        try:
            if self._prompt is None:
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            else:
                inputs = self._with_prompt(input_ids, attention_mask)
                if labels is not None:  # nothing is predicted for the prompt, nor the bos after it
                    skip = labels.new_full((labels.shape[0], self.prompt_length + 1), -100)
                    labels = torch.cat([skip, labels[:, 1:]], 1)
            out = self.decoder(**inputs, labels=labels, encoder_hidden_states=visual,
                               encoder_attention_mask=visual_mask, **decoder_kwargs)
        finally:
            self._condition = self._prompt = None
        if self.prompt_length:  # logits of the report's own positions only (attentions keep all)
            out.logits = out.logits[:, self.prompt_length:]
        out.observation_logits = logits
        if logits is not None and observation_targets is not None:
            out.observation_loss = observation_loss(logits, observation_targets)
        return out

    @torch.no_grad()
    def generate(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Report token ids (bos removed) via transformers' ``generate`` with the KV cache
        (``features``: ``image_features`` of these images, computed before)."""
        return self._generate(images, view_mask, features, **generate_kwargs)[0]

    @torch.no_grad()
    def decode_reports(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                       features: torch.Tensor | None = None, **generate_kwargs
                       ) -> tuple[list[str], torch.Tensor | None]:
        """The decoder's texts (stripped) and the observation head's probabilities ``[B, L]`` on
        the CPU (None without a head): what ``postprocess.post_process`` makes the reports of."""
        ids, logits = self._generate(images, view_mask, features, **generate_kwargs)
        texts = [text.strip() for text in self.decode(ids.cpu())]
        return texts, (logits.float().sigmoid().cpu() if logits is not None else None)

    def _generate(self, images: torch.Tensor, view_mask: torch.Tensor | None,
                  features: torch.Tensor | None, **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``generate``'s token ids and the observation head's logits (None without a head)."""
        visual, visual_mask, logits = self.encoder_states(images, view_mask, features=features)
        start = torch.full((images.shape[0], 1), self.config.bos_token_id, dtype=torch.long,
                           device=images.device)
        settings = {"max_new_tokens": 60, "do_sample": False, "num_beams": 1,
                    "eos_token_id": self.config.eos_token_id,
                    "pad_token_id": self.config.pad_token_id, **generate_kwargs}
        room = self.config.n_positions - start.shape[1] - self.prompt_length
        if settings["max_new_tokens"] > room:
            log.warning("max_new_tokens %d exceeds what the decoder's %d positions allow; using %d",
                        settings["max_new_tokens"], self.config.n_positions, room)
            settings["max_new_tokens"] = room
        try:
            if self._prompt is None:
                inputs = {"input_ids": start, "attention_mask": torch.ones_like(start)}
            else:  # transformers returns only the new tokens when given embeddings alone
                inputs = self._with_prompt(start, None)
            out = self.decoder.generate(**inputs, encoder_hidden_states=visual,
                                        encoder_attention_mask=visual_mask, **settings)
        finally:
            self._condition = self._prompt = None
        return (out if self.prompt_length else out[:, 1:]), logits

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Token ids -> report strings (special tokens dropped)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer attached; load it with from_pretrained")
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def parameter_summary(self) -> dict[str, int]:
        """Parameter counts per component (tied weights counted once)."""
        def count(params) -> int:
            return sum(p.numel() for p in {id(p): p for p in params}.values())
        cross = [p for n, p in self.decoder.named_parameters()
                 if any(part in n for part in CROSS_ATTENTION_PARTS)]
        return {
            "encoder": count(self.encoder.parameters()),
            "projection + view/grid embeddings": count([*self.projection.parameters(),
                                                        self.grid_embedding,
                                                        self.view_embedding.weight]),
            "observation head + guidance": count(self.guidance.parameters()) if self.guidance else 0,
            "decoder": count(self.decoder.parameters()),
            "  of which cross-attention": count(cross),
            "total": count(self.parameters()),
            "trainable": count(p for p in self.parameters() if p.requires_grad),
        }

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike, extra_files: dict[str, str] | None = None
                        ) -> Path:
        """Write config, weights, tokenizer and ``extra_files`` (name -> text) into
        ``directory``, replacing it atomically: a failed write (disk full, say)
        raises ``OSError`` naming ``directory`` and leaves the previous one as it was."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with write_errors_named(directory):
                self.write_files(staging)
                for name, text in (extra_files or {}).items():
                    (staging / name).write_text(text)
            replace_dir(honour_umask(staging), directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    def write_files(self, directory: Path) -> None:
        """Config, safetensors weights and tokenizer into an existing folder (not atomic)."""
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        save_model(self, str(directory / WEIGHTS_FILE))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
                        ) -> ReportGenerator:
        """Load a model saved with ``save_pretrained`` (weights from safetensors, never pickle),
        in eval mode; call ``.train()`` to fine-tune it."""
        directory = Path(directory)
        recover_dir(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no saved model in {directory}; notebook 04_training writes "
                                    "models/final (or pass the folder of another model)")
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: {directory} is not a saved ReportGenerator")
        data = read_capped(config_path, MAX_CONFIG_BYTES)  # ValueError naming the file
        try:
            values = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of > 4300 digits, too deep
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
        config = ReportGeneratorConfig.from_dict(values, str(config_path))
        check_weights_fit(config, config_path, weights_path)
        model = cls(config)
        try:
            load_model(model, str(weights_path), strict=True, device=str(device))
        except SafetensorError as exc:
            raise ValueError(f"weights {weights_path} are not a readable safetensors file "
                             f"(truncated or corrupt): {exc}") from None
        except (RuntimeError, OSError, ValueError) as exc:
            raise ValueError(f"weights {weights_path} do not fit {config_path}: "
                             f"{first_load_error(exc)}") from None
        if (directory / "tokenizer.json").exists():
            from medexgen_lib.tokenizer import load_tokenizer
            model.tokenizer = load_tokenizer(directory)
            check_tokenizer_fits_config(model.tokenizer, config, directory / "tokenizer.json", config_path)
        return model.to(device).eval()  # as transformers' from_pretrained: inference mode


def check_weights_fit(config: ReportGeneratorConfig, config_path: Path, weights_path: Path) -> None:
    """Refuse a config.json whose layers do not match the tensors in the safetensors header,
    before any real layer is built: the architecture is built on PyTorch's meta device (shapes,
    no memory) and its tensors compared with the header's names and shapes (no weight is read).
    ``ValueError`` naming both files and the first tensors that differ."""
    if not weights_path.is_file():
        raise ValueError(f"weights {weights_path} are not a regular file")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"weights {weights_path} are not a readable safetensors file "
                         f"(truncated or corrupt): {exc}") from None
    with torch.device("meta"):
        skeleton = ReportGenerator(config)
    tensors = skeleton.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}  # tied tensors (one object, several names) are saved once
    for name, tensor in tensors.items():
        names_of.setdefault(id(tensor), []).append(name)
    problems = [f"size mismatch for {name}: {list(shape)} in the weights, {list(tensors[name].shape)} "
                "by the config" for name, shape in stored.items()
                if name in tensors and shape != tuple(tensors[name].shape)]
    missing = [names[0] for names in names_of.values() if not any(name in stored for name in names)]
    unexpected = [name for name in stored if name not in tensors]
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config needs are not in the weights, "
                        f"e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the weights have no place in the config, "
                        f"e.g. {unexpected[:3]}")
    if problems:
        raise ValueError(f"weights {weights_path} do not fit {config_path}: {'; '.join(problems[:2])}")


def check_tokenizer_fits_config(tokenizer, config: ReportGeneratorConfig, tokenizer_path: Path,
                                config_path: Path) -> None:
    """Refuse a tokenizer that is not the model's (another model's tokenizer.json, say): its
    size and special token ids must be those ``config.json`` was built with."""
    found = {"vocab_size": len(tokenizer), **{f"{name}_token_id": getattr(tokenizer, f"{name}_token_id")
                                             for name in ("bos", "eos", "pad")}}
    wrong = [f"{key} {value} (config.json: {getattr(config, key)})" for key, value in found.items()
             if value != getattr(config, key)]
    if wrong:
        raise ValueError(f"tokenizer {tokenizer_path} is not the tokenizer of {config_path}: "
                         f"{', '.join(wrong)}")


def _check_guidance_fields(config: ReportGeneratorConfig, source: str) -> None:
    """The guidance lists of a config.json: labels are strings, a side label's finding is a
    label too; thresholds one number in (0, 1) per label; word ids one non-empty list of
    token ids inside the vocabulary per label. ``ValueError`` naming ``source`` otherwise."""
    labels = config.guidance_labels
    if isinstance(labels, list) and len(labels) > MAX_GUIDANCE_LABELS:
        raise ValueError(f"{source}: model config field 'guidance_labels' holds {len(labels)} labels, "
                         f"at most {MAX_GUIDANCE_LABELS} are allowed")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{source}: model config field 'guidance_labels' must be a list of names, "
                         f"got {labels!r}"[:300])
    count, known = len(labels), set(labels)
    orphans = [label for label in labels if ", " in label and label.split(", ")[0] not in known]
    if orphans:
        raise ValueError(f"{source}: model config field 'guidance_labels' has side labels {orphans} "
                         "without their finding's label")
    number = lambda t: isinstance(t, (int, float)) and not isinstance(t, bool)  # noqa: E731
    thresholds = config.guidance_thresholds
    if thresholds and (not isinstance(thresholds, list) or len(thresholds) != count
                       or not all(number(t) and 0 < t <= guidance.LABEL_OFF for t in thresholds)):
        raise ValueError(f"{source}: model config field 'guidance_thresholds' must hold one number "
                         f"in (0, 1] per guidance label ({count}), got {thresholds!r}")
    words = config.guidance_word_ids
    if isinstance(words, list):
        for at, ids in enumerate(words):
            if isinstance(ids, list) and len(ids) > MAX_LABEL_WORD_IDS:
                raise ValueError(f"{source}: model config field 'guidance_word_ids' holds {len(ids)} token "
                                 f"ids for label {at}, at most {MAX_LABEL_WORD_IDS} are allowed")
    fits = lambda ids: (isinstance(ids, list) and ids and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size for i in ids))
    if words and (not isinstance(words, list) or len(words) != count or not all(fits(ids) for ids in words)):
        raise ValueError(f"{source}: model config field 'guidance_word_ids' must hold one non-empty list "
                         f"of token ids below vocab_size ({config.vocab_size}) per guidance label "
                         f"({count}), got {words!r}"[:400])
    sentences = config.guidance_sentences
    if not isinstance(sentences, dict):
        raise ValueError(f"{source}: model config field 'guidance_sentences' must map guidance labels "
                         f"joined by ' + ' to a sentence, got {type(sentences).__name__}")
    keys = report_edits.bank_keys(labels)
    for key, text in sentences.items():
        if key not in keys or not isinstance(text, str) \
                or report_edits.bank_sentence_key(text, known) != key:
            raise ValueError(f"{source}: model config field 'guidance_sentences' maps {key!r} to "
                             f"{repr(text)[:200]}: a key must be a finding of 'guidance_labels' then its side "
                             "labels, joined by ' + ', and its value one sentence stating that "
                             "finding on those sides alone")
    normal = config.guidance_normal_sentences
    if not isinstance(normal, list) or not all(isinstance(s, str) and s.strip() for s in normal):
        raise ValueError(f"{source}: model config field 'guidance_normal_sentences' must be a list of "
                         f"non-empty sentences, got {normal!r}"[:300])
    if not isinstance(config.guidance_normal_report, str):
        raise ValueError(f"{source}: model config field 'guidance_normal_report' must be a report (text), "
                         f"got {type(config.guidance_normal_report).__name__}")
    if config.guidance_prompt and count + 2 > config.n_positions:
        raise ValueError(f"{source}: the guidance prompt ({count} labels) leaves no room in the "
                         f"decoder's {config.n_positions} positions")


def _gpt2_config(config: ReportGeneratorConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, add_cross_attention=True,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)


def check_tokenizer_fits_decoder(tokenizer, decoder: GPT2LMHeadModel, source: str) -> None:
    """Refuse a tokenizer whose base vocabulary is not the pretrained decoder's: its token ids
    would mean other strings to the pretrained embeddings."""
    base = tokenizer.vocab_size  # without added (special, medical) tokens
    pretrained = decoder.get_input_embeddings().weight.shape[0]
    name = getattr(tokenizer, "name_or_path", "") or "the run's tokenizer"
    if base != pretrained:
        raise PretrainedUnavailable(
            f"tokenizer {name} ({base} base tokens) is not the tokenizer of the pretrained GPT-2 "
            f"{source!r} ({pretrained} tokens): its token ids would mean other strings. Use "
            "tokenizer.kind='gpt2' with tokenizer.gpt2_source set to that model's tokenizer, or "
            "model.decoder_pretrained=false")


def _load_pretrained_gpt2(source: str) -> GPT2LMHeadModel:
    """GPT-2 weights from a local folder or the Hugging Face cache, then the hub."""
    errors = []
    for local_only in (True, False):
        try:
            return GPT2LMHeadModel.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise PretrainedUnavailable(
        f"pretrained GPT-2 {source!r} not found locally and not downloadable ({'; '.join(errors)}). "
        "Set model.decoder_source to a folder written by save_pretrained, fill the Hugging Face "
        "cache (huggingface-cli download gpt2), or set model.decoder_pretrained=false for "
        "random initialisation")


def _load_pretrained_resnet(trunk: nn.Sequential, name: str, weights_file: str) -> str:
    """Load ImageNet weights into the trunk; returns where they came from."""
    if weights_file:
        path = Path(weights_file)
        if not path.exists():
            raise PretrainedUnavailable(f"encoder weights file {path} does not exist "
                                        "(model.encoder_weights)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusing code, corrupt zip, ...
            raise PretrainedUnavailable(f"cannot load encoder weights {path} safely: {exc}") from None
        source = str(path)
    else:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as exc:  # no network, no cache
            raise PretrainedUnavailable(
                f"ImageNet weights for {name} are not in torch's cache ({torch.hub.get_dir()}/"
                f"checkpoints) and could not be downloaded ({exc}). Download {weights.url} there, "
                "set model.encoder_weights to a state-dict file, or set "
                "model.encoder_pretrained=false for random initialisation") from None
        source = weights.url
    resnet = getattr(torchvision.models, name)(weights=None)
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    wrong = [k for k in missing + unexpected if not k.startswith("fc.")]
    if wrong:
        raise PretrainedUnavailable(f"encoder weights {source} do not fit a {name}: "
                                    f"mismatched keys {wrong[:5]}")
    trunk.load_state_dict(nn.Sequential(*list(resnet.children())[:-2]).state_dict())
    return source


def first_load_error(exc: Exception) -> str:
    """The informative line of a state-dict loading error (torch puts a header line first)."""
    lines = [line.strip() for line in str(exc).strip().splitlines()] or [type(exc).__name__]
    return (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0])[:300]


@contextlib.contextmanager
def write_errors_named(target: Path):
    """Turn a failed write (``OSError``, or safetensors' own error for the same causes)
    into one ``OSError`` that names the folder being written and says it was kept."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"could not write {target} ({reason}); the previous {target.name} "
                      "is kept as it was") from None
