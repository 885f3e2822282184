"""What training optimises and how: AdamW parameter groups, the new token rows' learning rate,
the token loss, freezing the image side, and the precision a device gets."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F
from transformers import get_scheduler

from medexgen_lib.config import Config, TrainConfig
from medexgen_lib.model import CROSS_ATTENTION_PARTS, ReportGenerator

log = logging.getLogger(__name__)


def choose_precision(setting: str) -> str:
    """bf16 where the GPU supports it, fp16 (with loss scaling) on other GPUs, off on CPU."""
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def device_report(cfg: Config) -> dict:
    """What a run would use here: device, precision, processes, effective batch size."""
    import accelerate

    state = accelerate.PartialState(cpu=not torch.cuda.is_available())  # as train() will see it
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return {"device": device, "processes": state.num_processes,
            "precision": choose_precision(cfg.train.precision),
            "effective_batch": cfg.train.batch_size * cfg.train.grad_accum * state.num_processes,
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}


def parameter_groups(model: ReportGenerator, tcfg: TrainConfig) -> list[dict]:
    """AdamW groups: encoder, decoder (pretrained or not), new parts (projection, grid/view
    embeddings, the decoder's cross-attention layers, which a pretrained GPT-2 lacks, and
    embeddings of new tokens); biases and norm weights (1-D tensors) without weight decay.
    Each group lists its parameters' names under ``param_names``."""
    token_embeddings = model.decoder.get_input_embeddings().weight
    decoder_is_new = model.config.pretrained_vocab_size == 0  # random init: every token is new
    lrs = {"encoder": tcfg.lr_encoder, "decoder": tcfg.lr_decoder, "new": tcfg.lr_new}
    buckets: dict[tuple[str, bool], list] = {(g, d): [] for g in lrs for d in (True, False)}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if name.startswith("encoder."):
            group = "encoder"
        elif (name.startswith("decoder.") and not (param is token_embeddings and decoder_is_new)
              and (tcfg.cross_attention_lr == "decoder"
                   or not any(part in name for part in CROSS_ATTENTION_PARTS))):
            group = "decoder"
        else:
            group = "new"
        buckets[(group, param.ndim >= 2)].append((name, param))
    return [{"params": [p for _, p in members], "param_names": [n for n, _ in members],
             "lr": lrs[group], "weight_decay": tcfg.weight_decay if decay else 0.0,
             "name": f"{group}{'' if decay else ' (no decay)'}"}
            for (group, decay), members in buckets.items() if members]


class NewTokenRows:
    """Gives the rows a pretrained GPT-2 did not have the ``new`` learning rate.

    The token embedding matrix is one tensor (tied to the output layer), so its
    pretrained rows train at the decoder's rate; after each optimizer step the
    new rows' update is rescaled by lr_new / lr_decoder, which for AdamW (update
    proportional to the learning rate, decay included) is exactly a step at lr_new.
    """

    def __init__(self, model: ReportGenerator, tcfg: TrainConfig) -> None:
        first_new = model.config.pretrained_vocab_size
        self.weight = model.decoder.get_input_embeddings().weight
        has_new_rows = 0 < first_new < self.weight.shape[0]
        self.active = has_new_rows and tcfg.lr_new != tcfg.lr_decoder
        if has_new_rows and not self.active:
            log.info("train.lr_new equals train.lr_decoder: the %d new token rows train at the "
                     "decoder's rate with the pretrained ones", self.weight.shape[0] - first_new)
        self.rows = slice(first_new, None)
        self.ratio = tcfg.lr_new / tcfg.lr_decoder
        self.before = None

    def before_step(self) -> None:
        if self.active:
            self.before = self.weight.data[self.rows].clone()

    @torch.no_grad()
    def after_step(self) -> None:
        if self.active:
            rows = self.weight.data[self.rows]
            rows.add_((rows - self.before) * (self.ratio - 1.0))


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (``train.label_smoothing`` applied) of a batch and the
    number of tokens it scored.

    A sum, not a mean: the loop divides it by the scored tokens of the whole accumulation
    window (every micro-batch, every process), so ``grad_accum`` micro-batches make the
    same gradient as one batch of their combined size, whatever their token counts.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    return loss, (labels != -100).sum()


def freeze_image_side(model: ReportGenerator, frozen: bool, head: bool = False) -> None:
    """``train.encoder_epochs``: after them the encoder stops training (no gradients, BatchNorm
    on its running statistics), and with ``head`` (``train.freeze_head``) the observation head
    too; the rest goes on from the cached features, at a fraction of an epoch's cost."""
    parts = [model.encoder, *([model.guidance.head] if head and model.guidance is not None else [])]
    for part in parts:
        for parameter in part.parameters():
            parameter.requires_grad_(not frozen)
    if frozen:
        model.encoder.eval()


def freeze_batchnorm(model: ReportGenerator) -> None:
    """Put the encoder's BatchNorm layers in eval mode (running statistics, no updates) while the
    rest trains: ``train.freeze_batchnorm``, for small batches or a pretrained encoder."""
    for module in model.encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def make_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The learning-rate schedule ``train.scheduler`` names: transformers' (warmup, then decay over
    the run's optimizer steps), or ``plateau``: halved when the val selection value stalls."""
    if tcfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    total = steps_per_epoch * tcfg.epochs
    return get_scheduler(tcfg.scheduler, optimizer, num_warmup_steps=int(tcfg.warmup_ratio * total),
                         num_training_steps=total)
