"""The one batch type every loader (CPU webdataset, DALI) produces and every stage consumes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass
class CTBatch:
    volume: torch.Tensor  # float [B, 1, D, H, W] (int16 [B, 1, D, H, W] when loader.raw=true)
    report: list[str]
    key: list[str]
    anatomy: Optional[torch.Tensor] = None  # uint8 [B, 1, D, H, W], label map in meta["mask_labels"]
    labels: Optional[torch.Tensor] = None  # float [B, K]; 1 / 0 / -1 uncertain, joined by key
    is_pad: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # [B] repeats
    meta: list[dict] = field(default_factory=list)
    # fVLM (loader.organ_texts): per sample, one text per organ (None: its report split failed),
    # and which organs are normal [B, K]
    organ_text: Optional[list] = None
    organ_normal: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.key)

    def to(self, device, non_blocking: bool = True) -> "CTBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return self._map(mv)

    def pin_memory(self) -> "CTBatch":
        return self._map(lambda t: None if t is None else t.pin_memory())

    def _map(self, fn) -> "CTBatch":
        return replace(self, volume=fn(self.volume), anatomy=fn(self.anatomy), labels=fn(self.labels),
                       is_pad=fn(self.is_pad), organ_normal=fn(self.organ_normal))
