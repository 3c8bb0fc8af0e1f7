"""The DeepSpeed config of a run, derived from the typed config (users never write JSON)."""
from __future__ import annotations

import torch


def resolve_precision(precision: str, use_gpu: bool) -> str:
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16 (fp16 is not supported), got {precision!r}")
    return precision


def deepspeed_config(tc, oc, micro_batch: int, accum: int) -> dict:
    if tc.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {tc.zero_stage}")
    bf16 = resolve_precision(tc.precision, tc.use_gpu) == "bf16"
    if bf16 and not tc.use_gpu and not torch.backends.mkldnn.is_available():
        raise ValueError("bf16 on this CPU is unsupported; use train.precision=fp32")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": oc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,  # our metrics report steps; DeepSpeed's own log stays quiet
        "wall_clock_breakdown": False,
    }
