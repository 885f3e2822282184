"""Writing reports for a split: the one code path of validation (training), evaluation (stage 05),
the gallery (``visualize``) and the inspector; ``decode_settings`` is also ``generate``'s."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from medexgen_lib.config import EvalConfig
from medexgen_lib.dataset import ReportDataset, collate
from medexgen_lib.postprocess import post_process
from medexgen_lib.progress import ProgressBar

if TYPE_CHECKING:
    from medexgen_lib.model import ReportGenerator


def decode_settings(decode: EvalConfig) -> dict:
    """The keyword arguments ``generate`` receives; part of the evaluation fingerprint."""
    settings = {"num_beams": decode.num_beams, "max_new_tokens": decode.max_new_tokens,
                "length_penalty": decode.length_penalty, "do_sample": False}
    if decode.no_repeat_ngram_size:
        settings["no_repeat_ngram_size"] = decode.no_repeat_ngram_size
    return settings


@torch.no_grad()
def generate_reports(model: ReportGenerator, data: ReportDataset, decode: EvalConfig,
                     device: torch.device | str = "cpu", progress: bool = True,
                     features: Callable[[list[str]], torch.Tensor] | None = None) -> list[dict]:
    """Reports for every study of ``data``, in order: uid, image ids, reference, prediction (the
    decoder's text after ``postprocess.post_process``) and the decoder's own text (``decoder_text``).
    ``features``: uids -> the encoder's feature maps, computed before (training's frozen encoder)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(data, batch_size=decode.batch_size, shuffle=False,
                        collate_fn=partial(collate, pad_token_id=model.config.pad_token_id))
    settings = decode_settings(decode)
    out = []
    for batch in ProgressBar(loader, desc="generating", unit="batch", disable=not progress, leave=False):
        known = {"features": features(batch["uids"])} if features is not None else {}
        drafts, probabilities = model.decode_reports(batch["images"].to(device), batch["view_mask"].to(device),
                                                     **known, **settings)
        texts = post_process(drafts, probabilities, model.config).texts
        for uid, prediction, draft in zip(batch["uids"], texts, drafts, strict=True):
            out.append({"uid": uid, "prediction": prediction, "decoder_text": draft})
    expected = [e.uid for e in data.examples]
    if [row["uid"] for row in out] != expected:
        raise RuntimeError(f"the loader returned studies in another order or number ({len(out)}) than the "
                           f"dataset's {len(expected)} examples; references would be paired with the "
                           "wrong predictions")
    for row, example in zip(out, data.examples):
        row["images"] = [i for i in example.image_ids if i is not None]
        row["reference"] = example.text
    model.train(was_training)
    return out
