"""One optimizer step of each stage, on a DeepSpeed engine (or anything with its API).

The engine's gradient-accumulation steps equal the micro-batches per step, so `engine.step()`
after each micro-batch's backward updates the weights exactly once, at the last one.
supervised: plain accumulation, each micro-batch's mean BCE scaled by 1/accum by DeepSpeed.
clip: one micro-batch -> a plain step; several -> GradCache, whose surrogates already carry the
exact global-batch gradient (so no 1/accum scaling). The contrastive loss is global over all
ranks and micro-batches; its gradient is right under DeepSpeed's averaging over ranks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..data.batch import CTBatch
from ..data.text import text_group_ids
from .gradcache import wide, gradcache_step
from .objectives import clip_objective, supervised_objective


def model_inputs(engine, batch: CTBatch) -> torch.Tensor:
    dtype = next(engine.module.parameters()).dtype  # bf16 under DeepSpeed bf16, else the model's own
    return batch.volume.to(engine.device, dtype=dtype, non_blocking=True)


def _labels(batches: Sequence[CTBatch], device) -> torch.Tensor:
    if any(b.labels is None for b in batches):
        raise ValueError("this objective needs silver labels: set loader.labels=<labels.parquet> "
                         "(written by `ctvlp label`)")
    return torch.cat([b.labels for b in batches]).to(device)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def supervised_step(engine, batches: Sequence[CTBatch], tc, timer, tokenize: Callable, kernels=None) -> float:
    """Masked BCE per micro-batch, gradients accumulated (`kernels`: unused, no Triton loss here)."""
    total = torch.zeros((), dtype=torch.float64)
    for b in batches:
        with timer("forward"):
            labels = _labels([b], engine.device)
            texts = tokenize(b.report) if tc.text_bce else None
            loss = supervised_objective(engine, model_inputs(engine, b), labels, tc.uncertain, texts)
        with timer("backward"):
            engine.backward(loss)
        with timer("optimizer"):
            engine.step()
        total += loss.detach().double().cpu()
    return float(total / len(batches))  # this rank's; the loop reports the mean and the max over ranks


def clip_step(engine, batches: Sequence[CTBatch], tc, timer, tokenize: Callable, kernels=None) -> float:
    """InfoNCE over the global batch (GradCache above one micro-batch); `kernels` gives the
    contrastive kernels' tiles (the config's `kernels:` section)."""
    labels = _labels(batches, engine.device) if tc.aux_weight else None

    groups = text_group_ids([t for b in batches for t in b.report]).to(engine.device) \
        if tc.group_identical_texts else None

    def loss_fn(zi, zt):
        # The logit scale and classifier are called on the module, not the engine: an engine output
        # divides its gradient by the accumulation steps in any backward but engine.backward, which
        # would scale GradCache's embedding gradients (and trip DeepSpeed's backward bookkeeping).
        return clip_objective(engine.module, zi, zt, labels, tc.aux_weight, tc.uncertain, groups, tc.aux_text,
                              kernels)

    return contrastive_step(engine, lambda v: engine("image", v), lambda t: engine("text", t),
                            [model_inputs(engine, b) for b in batches], [tokenize(b.report) for b in batches],
                            loss_fn, timer)


def contrastive_step(engine, encode_image: Callable, encode_text: Callable, images: Sequence, texts: Sequence,
                     loss_fn: Callable, timer) -> float:
    """One optimizer step of a contrastive loss over every micro-batch: a plain step for one,
    GradCache above. Returns the loss averaged over ranks (an auxiliary BCE is per rank)."""
    if len(images) == 1:
        with timer("forward"):
            loss = loss_fn(wide(encode_image(images[0])), wide(encode_text(texts[0])))
        with timer("backward"):
            engine.backward(loss)
        with timer("optimizer"):
            engine.step()
        return float(global_mean(loss.detach().double().cpu()))

    def backward(surrogate):
        with timer("backward"):
            engine.backward(surrogate, scale_wrt_gas=False)
        with timer("optimizer"):
            engine.step()

    loss = gradcache_step(encode_image, encode_text, images, texts, loss_fn, modules=[engine.module],
                          backward=backward, timer=timer)
    return float(global_mean(loss.double().cpu()))


from .fvlm import fvlm_step  # noqa: E402  (fvlm reuses this module's helpers)

STAGES = {"supervised": supervised_step, "clip": clip_step, "fvlm": fvlm_step}
