"""Blockwise symmetric InfoNCE with multi-positive targets, forward and backward fused per
tile, memory O(b * d): never a b x b matrix. The public API of the kernel.

    blockwise_clip_loss(image_features, text_features, logit_scale, *, group_ids=None, valid=None,
                        reduction="mean", impl="auto", process_group=None, grad_average=True,
                        fwd_tiles=None, bwd_tiles=None)

Logits are logit_scale * I T^T on the features as given. With `group_ids`, pairs with equal
ids are positives with uniform target mass (fVLM false-negative calibration); without, the
diagonal. `valid` (bool [b]) masks pairs: a masked row and its column take no part, exactly as if
removed, and "mean" divides by the number of valid rows (fVLM's dropped organs: the shapes stay
equal on every rank). No valid row gives a zero loss with zero gradients. Dispatch: CUDA tensors -> Triton; CPU tensors -> the chunked torch path of the same
online algorithm; impl="triton" on CPU runs the Triton kernels in the interpreter
(TRITON_INTERPRET=1). The Triton backward recomputes S once per direction (no atomics,
deterministic). Tiles default to contrastive_triton.clip_tiles, the measured rule; `fwd_tiles`
and `bwd_tiles` (ClipTiles or tuples in its order) override it, as the config's `kernels:`
section does.

Distributed (`process_group` given, each rank passes its own b/n rows): T and the group ids
are all-gathered (O(b d)), each rank computes its rows against all columns, column
statistics are merged with an O(b) all-reduce, and dT is reduce-scattered to its owners. The
returned loss is the global loss on every rank. With grad_average=True (DeepSpeed, DDP),
local gradients are scaled by the world size so that the averaged gradients equal the
single-process full-batch gradients.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .contrastive_ref import INVALID, chunked_backward, chunked_forward, merge_column_stats, positives_count, reference_clip_loss

__all__ = ["blockwise_clip_loss", "reference_clip_loss"]


def _use_triton(x: torch.Tensor, impl: str) -> bool:
    if impl == "torch":
        return False
    if impl == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be auto, triton or torch, got {impl!r}")
    return x.is_cuda


def _fwd(I, T, s, g_rows, g_cols, triton_path: bool, tf32: bool, tiles):
    if triton_path:
        from .contrastive_triton import triton_forward

        return triton_forward(I, T, s, g_rows, g_cols, tf32, tiles=tiles)
    lse_r, cmax, csum, pos = chunked_forward(I, T, s, g_rows, g_cols)
    return lse_r, cmax[None], csum[None], pos


def _bwd(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, triton_path: bool, tf32: bool, reduce_dT: bool,
         tiles):
    if triton_path:
        from .contrastive_triton import triton_backward

        return triton_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef, tf32,
                               grad_dtype=torch.float32 if reduce_dT else None, tiles=tiles)
    return chunked_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef)


class _BlockwiseClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, I, T, scale, groups, reduction, triton_path, tf32, group, grad_average, diagonal, masked, tiles):
        I, T = I.contiguous(), T.contiguous()
        s = scale.detach().reshape(1).to(torch.float64 if I.dtype == torch.float64 else torch.float32).contiguous()
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        b_loc = I.shape[0]
        if group is not None:
            T_all = _all_gather(T, group)
            g_all = _all_gather(groups, group)
        else:
            T_all, g_all = T, groups
        b = T_all.shape[0]
        acc = torch.float64 if I.dtype == torch.float64 else torch.float32
        if diagonal:  # one positive per row: no sort of the group ids (it syncs the device)
            n_rows = torch.ones(b_loc, dtype=acc, device=I.device)
        else:
            n_rows = positives_count(groups, g_all).to(acc)
        if triton_path and group is None:  # forward kernel + one finalize launch
            from .contrastive_triton import triton_forward_loss

            lse_r, lse_c, loss = triton_forward_loss(I, T_all, s, groups, g_all, n_rows, tf32, tiles=tiles[0])
        else:
            lse_r, cmax, csum, pos = _fwd(I, T_all, s, groups, g_all, triton_path, tf32, tiles[0])
            if group is not None:  # merge this rank's column stats with the others' (O(b) traffic)
                m_loc = cmax.max(0).values
                m_glob = m_loc.clone()
                dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
                sums = (csum * torch.exp(cmax - m_glob)).sum(0)
                dist.all_reduce(sums, group=group)
                lse_c = m_glob + torch.log(sums)
            else:
                lse_c = merge_column_stats(cmax, csum)
            own = slice(rank * b_loc, (rank + 1) * b_loc)
            terms = 0.5 * (lse_r + lse_c[own]) - pos / n_rows
            loss = torch.where(groups != INVALID, terms, 0.0).sum() if masked else terms.sum()
            if group is not None:
                dist.all_reduce(loss, group=group)
        # the mean's divisor: b, or the number of valid rows of the global batch (a tensor: no sync)
        denom = (g_all != INVALID).sum().to(acc).clamp_min(1) if masked else b
        if reduction == "mean":
            loss = loss / denom
        elif reduction != "sum":
            raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
        ctx.save_for_backward(I, T_all, s, groups, g_all, lse_r, lse_c, n_rows)
        ctx.cfg = (reduction, denom, triton_path, tf32, group, grad_average, world, rank, b_loc, scale.dtype, scale.shape,
                   tiles[1])
        return loss.to(I.dtype if I.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        I, T_all, s, g_rows, g_all, lse_r, lse_c, n_rows = ctx.saved_tensors
        reduction, denom, triton_path, tf32, group, grad_average, world, rank, b_loc, s_dtype, s_shape, bwd_tiles = ctx.cfg
        coef = grad_out.to(s.dtype) / (denom if reduction == "mean" else 1)
        if not triton_path:
            coef = coef.item()
        dI, dT_all, gs = _bwd(I, T_all, s, g_rows, g_all, lse_r, lse_c, n_rows, coef, triton_path, tf32,
                              reduce_dT=group is not None, tiles=bwd_tiles)
        if group is not None:
            dT = torch.empty((b_loc, dT_all.shape[1]), dtype=dT_all.dtype, device=dT_all.device)
            dist.reduce_scatter_tensor(dT, dT_all.contiguous(), group=group)
            if grad_average:
                dI, dT, gs = dI * world, dT * world, gs * world
        else:
            dT = dT_all
        return (dI.to(I.dtype), dT.to(I.dtype), gs.to(s_dtype).reshape(s_shape), *[None] * 9)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def blockwise_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *, group_ids=None,
                        valid: torch.Tensor | None = None, reduction: str = "mean", impl: str = "auto", tf32: bool = True, process_group=None,
                        grad_average: bool = True, fwd_tiles=None, bwd_tiles=None) -> torch.Tensor:
    """(CE(image->text) + CE(text->image)) / 2 over the (global) batch; see the module doc."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"features must both be [b, d], got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=image_features.device)
    b_loc = image_features.shape[0]
    if image_features.dtype == torch.float64:
        impl = "torch" if impl == "auto" else impl
    tri = _use_triton(image_features, impl)
    ids_dtype = torch.int32 if tri else torch.int64  # the kernels compare int32 ids
    diagonal = group_ids is None
    if diagonal:
        rank = dist.get_rank(process_group) if process_group is not None else 0
        group_ids = torch.arange(rank * b_loc, (rank + 1) * b_loc, device=image_features.device, dtype=ids_dtype)
    groups = group_ids.to(device=image_features.device, dtype=ids_dtype).contiguous()
    if groups.shape != (b_loc,):
        raise ValueError(f"group_ids must have shape [{b_loc}], got {tuple(groups.shape)}")
    if valid is not None:
        if valid.shape != (b_loc,) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape [{b_loc}], got {valid.dtype} {tuple(valid.shape)}")
        groups = torch.where(valid.to(groups.device), groups, torch.full_like(groups, INVALID))
    return _BlockwiseClipLoss.apply(image_features, text_features, logit_scale, groups, reduction, tri, tf32,
                                    process_group, grad_average, diagonal, valid is not None, (fwd_tiles, bwd_tiles))
