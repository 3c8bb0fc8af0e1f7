"""Symmetric (multi-positive) InfoNCE: the dense reference and the chunked torch path.

Notation: S = s * I T^T (b_r x b_c), m_ij = [g_i == g_j], n_i = #{j : g_j == g_i}.
  row CE_i    = lse_j S_ij - (1/n_i) sum_j m_ij S_ij
  column CE_j = lse_i S_ij - (1/n_j) sum_i m_ij S_ij
  loss (sum)  = (sum_i CE_i + sum_j CE_j) / 2,    loss (mean) = loss (sum) / b
Because m is symmetric and n_i = n_j whenever m_ij = 1, both positive terms are equal:
  loss (sum)  = (sum_i lse_r_i + sum_j lse_c_j) / 2 - sum_i pos_i / n_i,  pos_i = sum_j m_ij S_ij
  dL/dS_ij    = (exp(S_ij - lse_r_i) + exp(S_ij - lse_c_j)) / 2 - m_ij / n_i      (sum reduction)
and with S = s I T^T: dI = s G T, dT = s G^T I, ds = sum_ij G_ij S_ij / s.

A row mask (`valid`) removes pairs: a masked row i and its column i take no part, as if they
were not in the batch, and the mean is over valid rows. Inside the kernels a masked row carries
the group id INVALID, so that the ids alone say which rows and columns count; a masked entry's
statistics are neutral (row lse and pos 0, column max -inf and sum 0, gradient 0) or NaN, and
the callers leave them out of the loss.
"""
from __future__ import annotations

import torch

INVALID = -(2 ** 31)  # the group id of a masked row (int32 min: reserved, never a user id)


def positives_count(group_rows: torch.Tensor, group_all: torch.Tensor) -> torch.Tensor:
    """n_i for each row: how many columns (of the whole batch) share its group."""
    uniq, inv, counts = torch.unique(group_all, return_inverse=True, return_counts=True)
    idx = torch.searchsorted(uniq, group_rows)
    return counts[idx].to(torch.float64 if group_all.is_floating_point() else torch.float32)


def reference_clip_loss(image_features, text_features, logit_scale, *, group_ids=None, reduction="mean", valid=None):
    """Plain dense torch (b x b logits): the ground truth for tests. Same signature as the kernel;
    `valid` removes the masked pairs first."""
    if valid is not None:
        image_features, text_features = image_features[valid], text_features[valid]
        group_ids = None if group_ids is None else group_ids[valid]
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


class _Positives:
    """The positive term without a mask: sum_j m_ij S_ij = s I_i . Tg[g_i], with Tg the sum of T
    over a group's columns. When every group has exactly one column (the diagonal: no group ids)
    row i's only positive is its partner column, indexed directly, so nothing of size b x d is
    built; otherwise Tg and Ig are [number of groups, d]. Applied `chunk` rows at a time."""

    def __init__(self, If, Tf, g_rows, g_cols, inv_n):
        uniq, self.col_idx, counts = torch.unique(g_cols, return_inverse=True, return_counts=True)
        self.row_idx = torch.searchsorted(uniq, g_rows)
        self.If, self.Tf, self.inv_n = If, Tf, inv_n
        self.single = bool(counts.max() == 1)
        if self.single:  # column of each group, then each row's partner column
            col_of_group = torch.empty(len(uniq), dtype=torch.long, device=Tf.device)
            col_of_group[self.col_idx] = torch.arange(len(g_cols), device=Tf.device)
            self.partner = col_of_group[self.row_idx]
        else:
            self.Tg = torch.zeros(len(uniq), Tf.shape[1], dtype=Tf.dtype, device=Tf.device).index_add_(0, self.col_idx, Tf)

    def t_of_rows(self, a, e):  # sum over i's group of T_j, for rows a:e
        return self.Tf[self.partner[a:e]] if self.single else self.Tg[self.row_idx[a:e]]

    def pos(self, s, a, e):
        return s * (self.If[a:e] * self.t_of_rows(a, e)).sum(1)

    def add_to_dT(self, dT, alpha, chunk):
        """dT_j += alpha * sum_i m_ij I_i / n_i over these rows."""
        if self.single:
            for a, e in _chunks(self.If.shape[0], chunk):
                dT.index_add_(0, self.partner[a:e], self.If[a:e] * self.inv_n[a:e, None], alpha=alpha)
            return
        Ig = torch.zeros_like(self.Tg)
        for a, e in _chunks(self.If.shape[0], chunk):
            Ig.index_add_(0, self.row_idx[a:e], self.If[a:e] * self.inv_n[a:e, None])
        for a, e in _chunks(dT.shape[0], chunk):
            dT[a:e].add_(Ig[self.col_idx[a:e]], alpha=alpha)


def _scatter(mask: torch.Tensor, values: torch.Tensor, fill: float) -> torch.Tensor:
    """Values of the True entries back to the mask's full length; `fill` elsewhere."""
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def chunked_forward(I, T, s, g_rows, g_cols, chunk: int = 64):
    """Rows of I against all columns of T, `chunk` rows at a time (memory O(chunk * b_c)).

    Returns row lse [b_r], column partial stats (max [b_c], sum of exp(S - max) [b_c]) from these
    rows, and pos [b_r]. Masked rows and columns (id INVALID) are left out: the pass runs on the
    valid ones, and the results are scattered back with neutral values."""
    vr, vc = g_rows != INVALID, g_cols != INVALID
    if not bool(vc.any()):  # nothing valid in the whole batch
        none = I.new_empty(0, dtype=_acc_dtype(I))
        return _scatter(vr, none, 0.0), _scatter(vc, none, -float("inf")), _scatter(vc, none, 0.0), _scatter(vr, none, 0.0)
    if not (bool(vr.all()) and bool(vc.all())):
        lse_v, cmax_v, csum_v, pos_v = chunked_forward(I[vr], T[vc], s, g_rows[vr], g_cols[vc], chunk)
        return (_scatter(vr, lse_v, 0.0), _scatter(vc, cmax_v, -float("inf")), _scatter(vc, csum_v, 0.0),
                _scatter(vr, pos_v, 0.0))
    b_r, b_c = I.shape[0], T.shape[0]
    dev, acc = I.device, _acc_dtype(I)
    Tf, If, s = T.to(acc), I.to(acc), s.to(acc)
    posi = _Positives(If, Tf, g_rows, g_cols, None)
    lse_r = torch.empty(b_r, dtype=acc, device=dev)
    pos = torch.empty(b_r, dtype=acc, device=dev)
    cmax = torch.full((b_c,), -float("inf"), dtype=acc, device=dev)
    csum = torch.zeros(b_c, dtype=acc, device=dev)
    for a, e in _chunks(b_r, chunk):
        S = torch.mm(If[a:e], Tf.T).mul_(s)
        lse_r[a:e] = torch.logsumexp(S, dim=1)
        pos[a:e] = posi.pos(s, a, e)
        m = torch.maximum(cmax, S.max(0).values)
        csum = csum * torch.exp(cmax - m) + S.sub_(m).exp_().sum(0)  # S is spent after this line
        cmax = m
        del S
    return lse_r, cmax, csum, pos


def chunked_backward(I, T, s, g_rows, g_cols, lse_r, lse_c, n_rows, coef: float, chunk: int = 64):
    """G = coef * [(exp(S - lse_r) + exp(S - lse_c)) / 2 - m / n]; returns dI, dT (partial over
    these rows), and sum(G * S) / s for d logit_scale. Each S chunk is recomputed once. Masked
    rows and columns get zero gradient."""
    acc = _acc_dtype(I)
    vr, vc = g_rows != INVALID, g_cols != INVALID
    if not bool(vc.any()):  # nothing valid in the whole batch
        return (torch.zeros(I.shape, dtype=acc, device=I.device), torch.zeros(T.shape, dtype=acc, device=I.device),
                torch.zeros(1, dtype=acc, device=I.device))
    if not (bool(vr.all()) and bool(vc.all())):
        dI_v, dT_v, gs = chunked_backward(I[vr], T[vc], s, g_rows[vr], g_cols[vc], lse_r[vr], lse_c[vc], n_rows[vr],
                                          coef, chunk)
        dI = torch.zeros(I.shape, dtype=acc, device=I.device)
        dT = torch.zeros(T.shape, dtype=acc, device=I.device)
        dI[vr], dT[vc] = dI_v, dT_v
        return dI, dT, gs
    Tf, If, s = T.to(acc), I.to(acc), s.to(acc)
    inv_n = 1.0 / n_rows.to(acc)
    posi = _Positives(If, Tf, g_rows, g_cols, inv_n)
    dI = torch.empty_like(If)
    dT = torch.zeros_like(Tf)
    gs = torch.zeros(1, dtype=acc, device=I.device)
    for a, e in _chunks(I.shape[0], chunk):
        S = torch.mm(If[a:e], Tf.T).mul_(s)
        P = torch.sub(S, lse_r[a:e, None]).exp_()  # at most three chunk-sized buffers live: S, P, Q
        Q = torch.sub(S, lse_c[None, :]).exp_()
        P.add_(Q).mul_(0.5 * coef)
        del Q
        gs += torch.dot(P.flatten(), S.flatten())
        del S
        torch.mm(P, Tf, out=dI[a:e])
        dT.addmm_(P.T, If[a:e])
        del P
        dI[a:e].sub_(posi.t_of_rows(a, e) * inv_n[a:e, None], alpha=coef).mul_(s)
        gs -= coef * (posi.pos(s, a, e) * inv_n[a:e]).sum()
    posi.add_to_dT(dT, -coef, chunk)
    dT.mul_(s)
    return dI, dT, gs / s


def merge_column_stats(cmax: torch.Tensor, csum: torch.Tensor) -> torch.Tensor:
    """Partial (max, sum of exp(x - max)) per program, split or rank, stacked on dim 0 -> lse."""
    m = cmax.max(0).values
    return m + torch.log((csum * torch.exp(cmax - m)).sum(0))
