"""AdamW with open_clip's decay rule and a warmup + cosine schedule.

Weight decay applies to weight matrices and conv kernels only: norms, biases and the logit
scale (every parameter with fewer than 2 dimensions) are exempt, as in open_clip and CLIP.
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, rest = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, schedule: str, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup, then cosine
    from 1 down to min_ratio at `total`, or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"optim.schedule must be cosine or constant, got {schedule!r}")
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class _Factor:
    """The lr lambda as an object: LambdaLR checkpoints its __dict__ (plain numbers and a string),
    which loads with torch.load(weights_only=True)."""

    def __init__(self, total: int, oc):
        self.total, self.schedule, self.warmup, self.min_ratio = total, oc.schedule, oc.warmup_steps, oc.min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.schedule, self.warmup, self.min_ratio)


def build_optimizer(model: torch.nn.Module, oc, total_steps: int):
    """(AdamW, LambdaLR) for `optim:` and a run of total_steps optimizer steps."""
    opt = torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    lr_factor(0, total_steps, oc.schedule, oc.warmup_steps, oc.min_lr_ratio)  # validates the schedule name
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _Factor(total_steps, oc))
