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

from typing import Callable, Sequence

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


def gradcache_step(encode_image: Callable, encode_text: Callable, images: Sequence, texts: Sequence,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   modules: Sequence[nn.Module] = ()) -> torch.Tensor:
    """One contrastive step over len(images) micro-batches; gradients accumulate in .grad.

    encode_image(images[k]) / encode_text(texts[k]) -> embeddings of micro-batch k;
    loss_fn(all image embeddings, all text embeddings) -> scalar (it may all-gather across ranks);
    modules: the models whose BatchNorm statistics must be updated once. Returns the loss.
    """
    if len(images) != len(texts):
        raise ValueError("images and texts must have the same number of micro-batches")
    snapshot = _bn_buffers(modules)
    states, zi, zt = [], [], []
    with torch.no_grad():
        for x, t in zip(images, texts):
            states.append(_RNG())
            zi.append(encode_image(x))
            zt.append(encode_text(t))
    after_pass1 = _RNG()
    for buf, saved in snapshot:  # the re-run is the one update of the running statistics
        buf.copy_(saved)
    Zi = torch.cat(zi).detach().requires_grad_()
    Zt = torch.cat(zt).detach().requires_grad_()
    loss = loss_fn(Zi, Zt)
    loss.backward()
    gi, gt = Zi.grad.split([z.shape[0] for z in zi]), Zt.grad.split([z.shape[0] for z in zt])
    for k, (x, t) in enumerate(zip(images, texts)):
        states[k].restore()
        torch.autograd.backward([encode_image(x), encode_text(t)], [gi[k], gt[k]])
    after_pass1.restore()  # the caller's RNG stream continues as if each micro-batch ran once
    return loss.detach()
