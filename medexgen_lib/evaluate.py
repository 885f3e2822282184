"""Batched report generation (transformers' generate: greedy or beam, KV cache)."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medexgen_lib.config import EvalConfig
from medexgen_lib.dataset import ReportDataset, collate


def decode_settings(decode: EvalConfig) -> dict:
    """The keyword arguments ``generate`` receives; part of the evaluation fingerprint."""
    settings = {"num_beams": decode.num_beams, "max_new_tokens": decode.max_new_tokens,
                "length_penalty": decode.length_penalty, "do_sample": False}
    if decode.no_repeat_ngram_size:
        settings["no_repeat_ngram_size"] = decode.no_repeat_ngram_size
    return settings


@torch.no_grad()
def generate_reports(model, data: ReportDataset, decode: EvalConfig, device: torch.device | str = "cpu",
                     progress: bool = True) -> list[dict]:
    """Reports for every study of ``data``, in order: uid, image ids, reference, prediction."""
    was_training = model.training
    model.eval()
    loader = DataLoader(data, batch_size=decode.batch_size, shuffle=False,
                        collate_fn=partial(collate, pad_token_id=model.config.pad_token_id))
    settings = decode_settings(decode)
    out = []
    for batch in tqdm(loader, desc="generating", unit="batch", disable=not progress, leave=False):
        ids = model.generate(batch["images"].to(device), batch["view_mask"].to(device), **settings)
        for uid, prediction in zip(batch["uids"], model.decode(ids.cpu())):
            out.append({"uid": uid, "prediction": prediction.strip()})
    for row, example in zip(out, data.examples):
        row["images"] = [i for i in example.image_ids if i is not None]
        row["reference"] = example.text
    model.train(was_training)
    return out
