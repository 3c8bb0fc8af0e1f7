"""The one batch type every loader (CPU webdataset, DALI) produces and every stage consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
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

    def __len__(self) -> int:
        return len(self.key)

    def to(self, device, non_blocking: bool = True) -> "CTBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CTBatch(mv(self.volume), self.report, self.key, mv(self.anatomy), mv(self.labels), mv(self.is_pad), self.meta)

    def pin_memory(self) -> "CTBatch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return CTBatch(pin(self.volume), self.report, self.key, pin(self.anatomy), pin(self.labels), pin(self.is_pad), self.meta)
