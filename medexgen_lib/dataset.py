"""Per-study training examples: two views (frontal, lateral), token ids, masked labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medexgen_lib.images import ImageCache, normalize, train_augmentation
from medexgen_lib.tokenizer import encode_for_training

log = logging.getLogger(__name__)

VIEWS = ("frontal", "lateral")
IGNORE_INDEX = -100  # label value the loss skips (padding)


@dataclass
class StudyExample:
    uid: str
    image_ids: tuple[str | None, str | None]  # frontal, lateral (None: blank view)
    text: str
    input_ids: list[int]


def pick_views(image_ids: list[str], projections: list[str], cache: ImageCache,
               missing_view: str) -> tuple[str | None, str | None] | None:
    """Frontal and lateral image ids of a study, or None if the study cannot be used.

    Known projections are used first; images of unknown projection fill the
    free slots in report order. A missing view is duplicated from the other
    (``duplicate``), left blank (``blank``, masked out in the model) or makes
    the study unusable (``drop``).
    """
    slots: dict[str, str | None] = {view: None for view in VIEWS}
    usable = [(i, p) for i, p in zip(image_ids, projections) if i in cache]
    for image_id, projection in usable:
        if projection in slots and slots[projection] is None:
            slots[projection] = image_id
    for image_id, projection in usable:
        if projection not in slots and image_id not in slots.values():
            free = next((v for v in VIEWS if slots[v] is None), None)
            if free:
                slots[free] = image_id
    frontal, lateral = slots["frontal"], slots["lateral"]
    if frontal is None and lateral is None:
        return None
    if frontal is None or lateral is None:
        if missing_view == "drop":
            return None
        if missing_view == "duplicate":
            frontal = frontal or lateral
            lateral = lateral or frontal
    return frontal, lateral


class ReportDataset(Dataset):
    """Studies of one split. Items hold uint8 pixels; ``collate`` normalises per batch."""

    def __init__(self, studies: pd.DataFrame, texts: pd.Series, cache: ImageCache, tokenizer,
                 max_length: int, missing_view: str = "duplicate", augment: bool = False,
                 shuffle_images_seed: int | None = None):
        self.cache = cache
        self.augment = train_augmentation() if augment else None
        self.examples: list[StudyExample] = []
        self.dropped = 0
        for row, text in zip(studies.itertuples(), texts.loc[studies.index]):
            views = pick_views(list(row.image_ids), list(row.projections), cache, missing_view)
            if views is None:
                self.dropped += 1
                continue
            self.examples.append(StudyExample(row.uid, views, text,
                                              encode_for_training(tokenizer, text, max_length)))
        if shuffle_images_seed is not None:
            # Control experiment: pair every report with another study's images.
            order = np.random.default_rng(shuffle_images_seed).permutation(len(self.examples))
            views = [self.examples[i].image_ids for i in order]
            for example, image_ids in zip(self.examples, views):
                example.image_ids = image_ids
        if self.dropped:
            log.info("%d studies left out: no usable image for the configured views "
                     "(images.missing_view=%s)", self.dropped, missing_view)

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, index: int) -> torch.Tensor:
        """uint8 ``[2, H, W]`` for the study's frontal and lateral view (zeros where blank)."""
        size = self.cache.size
        views = [self.cache.get(i) if i is not None else np.zeros((size, size), np.uint8)
                 for i in self.examples[index].image_ids]
        return torch.from_numpy(np.stack(views))

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        pixels = self.pixels(index)
        if self.augment is not None:
            pixels = torch.stack([self.augment(view.unsqueeze(0)).squeeze(0) for view in pixels])
        return {"uid": example.uid, "pixels": pixels,
                "view_mask": torch.tensor([i is not None for i in example.image_ids]),
                "input_ids": torch.tensor(example.input_ids)}


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Stack a batch: normalised images ``[B, 2, 3, H, W]``, padded ids, labels with padding = -100."""
    lengths = [len(item["input_ids"]) for item in batch]
    input_ids = torch.full((len(batch), max(lengths)), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (item, length) in enumerate(zip(batch, lengths)):
        input_ids[row, :length] = item["input_ids"]
        attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {
        "uids": [item["uid"] for item in batch],
        "images": normalize(torch.stack([item["pixels"] for item in batch])),
        "view_mask": torch.stack([item["view_mask"] for item in batch]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
