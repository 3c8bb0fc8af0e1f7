"""Retrieval metrics over embeddings, streamed: the similarity matrix is never held whole, so
memory is O(N K) for N queries and top-K, whatever N (69k scans: 69k x 100 indices).

image->image MAP@K: for each query, the mean Jaccard index between its label vector and those of
its top-K gallery items (cosine similarity), averaged over queries. The gallery is the volumes
with at least one positive finding; the query itself stays in it, as in the published CT-CLIP
protocol. `published_map_at_k` reproduces that script's figures, whose running list of per-query
means is not reset between K values (so its MAP@K averages over all K' <= K).
report->image Recall@K: the fraction of reports whose own volume is among the top-K volumes.
"""
from __future__ import annotations

import numpy as np
import torch


def streamed_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, block: int = 4096) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of every query over the gallery: (values [N, k], indices [N, k]),
    computed block by block of queries and of gallery items (a running top-k merges the blocks)."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    k = min(k, g.shape[0])
    vals = torch.empty(q.shape[0], k)
    idx = torch.empty(q.shape[0], k, dtype=torch.long)
    for i in range(0, q.shape[0], block):
        qb = q[i:i + block]
        best_v = torch.full((qb.shape[0], k), -float("inf"))
        best_i = torch.zeros((qb.shape[0], k), dtype=torch.long)
        for j in range(0, g.shape[0], block):
            sim = qb @ g[j:j + block].T
            v, ix = torch.topk(sim, min(k, sim.shape[1]), dim=1)
            cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, ix + j], 1)
            best_v, pos = torch.topk(cat_v, k, dim=1)
            best_i = torch.gather(cat_i, 1, pos)
        vals[i:i + block], idx[i:i + block] = best_v, best_i
    return vals, idx


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Jaccard of binary vectors (both empty: 0, as the published script would divide by 0)."""
    a, b = a.astype(bool), b.astype(bool)
    inter, union = (a & b).sum(-1), (a | b).sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _per_query(labels: np.ndarray, emb: torch.Tensor, ks, block: int):
    gallery = np.nonzero(labels.sum(1) > 0)[0]
    _, top = streamed_topk(emb, emb[torch.from_numpy(gallery)], max(ks), block)
    top = gallery[top.numpy()]  # gallery positions -> sample indices
    jac = jaccard(labels[:, None, :], labels[top])  # [N, Kmax]
    return {k: jac[:, :k].mean(1) for k in ks}  # per query: mean Jaccard of its top-k


def map_at_k(labels: np.ndarray, emb: torch.Tensor, ks=(1, 5, 10, 50), block: int = 4096) -> dict:
    """Correct MAP@K per K: {k: mean over queries of the mean top-k Jaccard}."""
    per = _per_query(np.asarray(labels), emb, ks, block)
    return {k: float(per[k].mean()) for k in ks}


def published_map_at_k(labels: np.ndarray, emb: torch.Tensor, ks=(1, 5, 10, 50), block: int = 4096) -> dict:
    """What the published CT-CLIP image-to-image script prints: its list of per-query means keeps
    growing across the K loop, so the figure for K is the mean over all queries and all K' <= K."""
    per = _per_query(np.asarray(labels), emb, ks, block)
    out, running = {}, []
    for k in ks:
        running.extend(per[k].tolist())
        out[k] = float(np.mean(running))
    return out


def recall_at_k(report_emb: torch.Tensor, image_emb: torch.Tensor, ks=(1, 5, 10, 50, 100),
                block: int = 4096) -> dict:
    """Report i's target is volume i."""
    _, top = streamed_topk(report_emb, image_emb, max(ks), block)
    hit = top == torch.arange(top.shape[0])[:, None]
    return {k: float(hit[:, :k].any(1).float().mean()) for k in ks}
