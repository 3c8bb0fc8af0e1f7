"""GradCache: a contrastive batch bounded by embedding memory, not activation memory.

1. Embed every micro-batch without grad (the RNG state before each is recorded).
2. Compute the loss over the whole (global) batch of embeddings; backprop to the embeddings
   (and to any parameter the loss uses directly: logit scale, shared classifier).
3. Re-run each micro-batch with grad, its RNG state restored so dropout and augmentation
   match, and backprop its cached embedding gradients.

BatchNorm: running statistics are snapshotted before step 1 and restored after it, so they
are updated once per micro-batch, by the re-run only. In train mode BN normalises each
micro-batch with its own statistics (ghost batch norm): the gradients are then exactly those
of a micro-batched forward, not of one full-batch forward. Full-batch equivalence is exact
with GroupNorm, or with BN in eval mode (frozen statistics, e.g. the CLIP stage started from
the supervised checkpoint).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn


class _RNG:
    """CPU and CUDA generator states, to replay stochastic layers in step 3."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _bn_buffers(modules: Sequence[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if buf is not None:
                        out.append((buf, buf.detach().clone()))
    return out


def wide(z: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 embeddings meet the loss in fp32 (the loss accumulates in fp32 anyway)."""
    return z.float() if z.dtype in (torch.bfloat16, torch.float16) else z


def gradcache_step(encode_image: Callable, encode_text: Callable, images: Sequence, texts: Sequence,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   modules: Sequence[nn.Module] = (), backward: Optional[Callable[[torch.Tensor], None]] = None,
                   timer=None) -> torch.Tensor:
    """One contrastive step over len(images) micro-batches; gradients accumulate in .grad.

    encode_image(images[k]) / encode_text(texts[k]) -> embeddings of micro-batch k;
    loss_fn(all image embeddings, all text embeddings) -> scalar (it may all-gather across ranks);
    modules: the models whose BatchNorm statistics must be updated once;
    backward(surrogate): runs (and times) one micro-batch's backward, called once per micro-batch;
    default `surrogate.backward()`; DeepSpeed: `engine.backward(s, scale_wrt_gas=False)`, `engine.step()`;
    timer: optional `timer(phase)` context manager for the phases "forward" and "backward".
    Returns the loss.

    Each micro-batch's surrogate is <z_k, dL/dz_k> (its gradient w.r.t. the towers is exactly the
    cached one). The last one adds the loss itself, so the parameters the loss uses directly
    (logit scale, shared classifier) get their gradient inside the same framework-managed backward.
    """
    if len(images) != len(texts):
        raise ValueError("images and texts must have the same number of micro-batches")
    timer = timer or (lambda phase: contextlib.nullcontext())
    if backward is None:
        def backward(surrogate: torch.Tensor) -> None:
            with timer("backward"):
                surrogate.backward()
    snapshot = _bn_buffers(modules)
    states, zi, zt = [], [], []
    with timer("forward"), torch.no_grad():
        for x, t in zip(images, texts):
            states.append(_RNG())
            zi.append(encode_image(x))
            zt.append(encode_text(t))
    after_pass1 = _RNG()
    for buf, saved in snapshot:  # the re-run is the one update of the running statistics
        buf.copy_(saved)
    with timer("forward"):
        Zi = wide(torch.cat(zi)).requires_grad_()
        Zt = wide(torch.cat(zt)).requires_grad_()
        loss = loss_fn(Zi, Zt)
    with timer("backward"):
        gi, gt = torch.autograd.grad(loss, [Zi, Zt], retain_graph=True)
    gi, gt = gi.split([z.shape[0] for z in zi]), gt.split([z.shape[0] for z in zt])
    last = len(images) - 1
    for k, (x, t) in enumerate(zip(images, texts)):
        states[k].restore()
        with timer("forward"):
            surrogate = (wide(encode_image(x)) * gi[k]).sum() + (wide(encode_text(t)) * gt[k]).sum()
            if k == last:
                surrogate = surrogate + loss
        backward(surrogate)
    after_pass1.restore()  # the caller's RNG stream continues as if each micro-batch ran once
    return loss.detach()
