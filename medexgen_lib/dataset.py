"""Per-study training examples: two views (frontal, lateral), token ids, masked labels."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medexgen_lib.images import ImageCache, normalize
from medexgen_lib.tokenizer import encode_for_training

log = logging.getLogger(__name__)

VIEWS = ("frontal", "lateral")
IGNORE_INDEX = -100  # label value the loss skips (padding)
# Augmentation ranges (images.train_augmentation's): rotation, shift (share of the side), zoom,
# brightness and contrast factors. Never a left/right flip: reports say left and right.
DEGREES, TRANSLATE, SCALE, BRIGHTNESS, CONTRAST = 5.0, 0.03, (0.95, 1.05), 0.1, 0.1


def augment_views(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random small rotation/shift/zoom, brightness and contrast for uint8 views ``[V, H, W]``.

    All views go through one ``affine_grid``/``grid_sample`` call on whatever device they
    are on, instead of torchvision's transform per view (2-3x cheaper per view on one CPU
    core; the same call augments a whole batch on a GPU). A blank (all-zero) view stays blank.
    """
    n = pixels.shape[0]
    device = pixels.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(n, *shape).uniform_(low, high, generator=generator).to(device)

    angle = uniform(-DEGREES, DEGREES) * (math.pi / 180)
    zoom = uniform(*SCALE)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.cos(angle) / zoom
    theta[:, 0, 1], theta[:, 1, 0] = -torch.sin(angle) / zoom, torch.sin(angle) / zoom
    theta[:, :, 2] = uniform(-2 * TRANSLATE, 2 * TRANSLATE, 2)  # grid coordinates span 2 per side
    grid = torch.nn.functional.affine_grid(theta, (n, 1, *pixels.shape[-2:]), align_corners=False)
    moved = torch.nn.functional.grid_sample(pixels.unsqueeze(1).float(), grid, mode="bilinear",
                                            padding_mode="zeros", align_corners=False)
    brightness = uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, 1, 1, 1)
    contrast = uniform(1 - CONTRAST, 1 + CONTRAST, 1, 1, 1)
    mean = moved.mean(dim=(2, 3), keepdim=True) * brightness
    out = moved.mul_(brightness * contrast).add_((1 - contrast) * mean).clamp_(0, 255)
    return out.round_().to(torch.uint8).squeeze(1)


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
        self.augment = augment
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
        if self.augment:
            pixels = augment_views(pixels)
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
