"""Symmetric (multi-positive) InfoNCE: the dense reference and the chunked torch path.

Notation: S = s * I T^T (b_r x b_c), m_ij = [g_i == g_j], n_i = #{j : g_j == g_i}.
  row CE_i    = lse_j S_ij - (1/n_i) sum_j m_ij S_ij
  column CE_j = lse_i S_ij - (1/n_j) sum_i m_ij S_ij
  loss (sum)  = (sum_i CE_i + sum_j CE_j) / 2,    loss (mean) = loss (sum) / b
Because m is symmetric and n_i = n_j whenever m_ij = 1, both positive terms are equal:
  loss (sum)  = (sum_i lse_r_i + sum_j lse_c_j) / 2 - sum_i pos_i / n_i,  pos_i = sum_j m_ij S_ij
  dL/dS_ij    = (exp(S_ij - lse_r_i) + exp(S_ij - lse_c_j)) / 2 - m_ij / n_i      (sum reduction)
and with S = s I T^T: dI = s G T, dT = s G^T I, ds = sum_ij G_ij S_ij / s.
"""
from __future__ import annotations

import torch


def positives_count(group_rows: torch.Tensor, group_all: torch.Tensor) -> torch.Tensor:
    """n_i for each row: how many columns (of the whole batch) share its group."""
    uniq, inv, counts = torch.unique(group_all, return_inverse=True, return_counts=True)
    idx = torch.searchsorted(uniq, group_rows)
    return counts[idx].to(torch.float64 if group_all.is_floating_point() else torch.float32)


def reference_clip_loss(image_features, text_features, logit_scale, *, group_ids=None, reduction="mean"):
    """Plain dense torch (b x b logits): the ground truth for tests. Same signature as the kernel."""
    b = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T
    if group_ids is None:
        target = torch.eye(b, dtype=logits.dtype, device=logits.device)
    else:
        m = (group_ids[:, None] == group_ids[None, :]).to(logits.dtype)
        target = m / m.sum(1, keepdim=True)
    ce_rows = -(target * torch.log_softmax(logits, dim=1)).sum(1)
    ce_cols = -(target.T * torch.log_softmax(logits.T, dim=1)).sum(1)
    total = (ce_rows.sum() + ce_cols.sum()) / 2
    return total / b if reduction == "mean" else total


# ---- chunked torch path: same online algorithm as the kernels, never b x b -------------------

def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(n: int, chunk: int):
    for a in range(0, n, chunk):
        yield a, min(n, a + chunk)


def chunked_forward(I, T, s, g_rows, g_cols, chunk: int = 256):
    """Rows of I against all columns of T, `chunk` rows at a time (memory O(chunk * b_c)).

    Returns row lse [b_r], column partial stats (max [b_c], sum of exp(S - max) [b_c]) from these
    rows, and pos [b_r]. All fp32.
    """
    b_r, b_c = I.shape[0], T.shape[0]
    dev, acc = I.device, _acc_dtype(I)
    lse_r = torch.empty(b_r, dtype=acc, device=dev)
    pos = torch.empty(b_r, dtype=acc, device=dev)
    cmax = torch.full((b_c,), -float("inf"), dtype=acc, device=dev)
    csum = torch.zeros(b_c, dtype=acc, device=dev)
    Tf, s = T.to(acc), s.to(acc)
    for a, e in _chunks(b_r, chunk):
        S = (s * (I[a:e].to(acc) @ Tf.T))
        lse_r[a:e] = torch.logsumexp(S, dim=1)
        pos[a:e] = torch.where(g_rows[a:e, None] == g_cols[None, :], S, torch.zeros((), device=dev)).sum(1)
        m = torch.maximum(cmax, S.max(0).values)
        csum = csum * torch.exp(cmax - m) + torch.exp(S - m).sum(0)
        cmax = m
        del S
    return lse_r, cmax, csum, pos


def chunked_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef: float, chunk: int = 256):
    """G = coef * [(exp(S - lse_r) + exp(S - lse_c)) / 2 - m / n]; returns dI, dT (partial over
    these rows), and sum(G * S) / s for d logit_scale. Recomputes each S chunk once."""
    acc = _acc_dtype(I)
    Tf, If, s = T.to(acc), I.to(acc), s.to(acc)
    dI = torch.empty_like(If)
    dT = torch.zeros_like(Tf)
    gs = torch.zeros(1, dtype=acc, device=I.device)
    for a, e in _chunks(I.shape[0], chunk):
        S = s * (If[a:e] @ Tf.T)
        m = (g_rows[a:e, None] == g_cols[None, :]).to(acc)
        G = coef * (0.5 * (torch.exp(S - lse_r[a:e, None]) + torch.exp(S - lse_c[None, :])) - m / n_rows[a:e, None])
        dI[a:e] = s * (G @ Tf)
        dT += s * (G.T @ If[a:e])
        gs += (G * S).sum() / s
        del S, m, G
    return dI, dT, gs


def merge_column_stats(cmax: torch.Tensor, csum: torch.Tensor) -> torch.Tensor:
    """Partial (max, sum) per program or rank, shape [P, b_c] -> column lse [b_c]."""
    m = cmax.max(0).values
    return m + torch.log((csum * torch.exp(cmax - m)).sum(0))
