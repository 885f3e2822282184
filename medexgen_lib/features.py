"""The frozen encoder's feature maps, computed once per split and looked up by study uid."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from medexgen_lib.dataset import ReportDataset
    from medexgen_lib.model import ReportGenerator


class FrozenFeatures:
    """The encoder's feature maps of every study of a split, computed once and looked up by
    uid while the encoder does not change: after ``train.encoder_epochs`` (train and val;
    images are not augmented) and within one validation (its three passes over val)."""

    def __init__(self, model: ReportGenerator, data: ReportDataset, collate_fn: Callable,
                 device: torch.device | str, batch_size: int = 32) -> None:
        self.features: dict[str, torch.Tensor] = {}
        # its own generator: building the cache leaves the run's random stream untouched
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                            generator=torch.Generator())
        with torch.no_grad():
            for batch in loader:
                maps = model.image_features(batch["images"].to(device), batch["view_mask"].to(device))
                for uid, study in zip(batch["uids"], maps.unflatten(0, (len(batch["uids"]), -1))):
                    self.features[uid] = study

    def __call__(self, uids: list[str]) -> torch.Tensor:
        """``[B*V, C, h, w]`` for these studies, as ``ReportGenerator.image_features`` returns."""
        return torch.stack([self.features[u] for u in uids]).flatten(0, 1)
