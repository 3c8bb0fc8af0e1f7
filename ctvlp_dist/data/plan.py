"""Which samples each rank and worker reads, batch by batch, in one epoch.

Pure functions of (num_samples, seed, epoch, world, batch size): every rank computes the
same global order without talking to the others. With last_batch="pad" each rank gets the
same number of full batches and repeats are flagged; with "drop" the tail is left out.
Either way no real sample appears twice in an epoch.
"""
from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def rank_batches(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world: int, batch_size: int,
                 last_batch: str = "pad") -> list[list[tuple[int, int, bool]]]:
    """-> this rank's batches; each item is (sample id, global position, is_pad)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    if n == 0:
        return []
    order = epoch_order(n, seed, epoch, shuffle)
    if last_batch == "drop":
        nb = n // (world * batch_size)
        total = nb * world * batch_size
    elif last_batch == "pad":
        per_rank = -(-n // world)
        nb = -(-per_rank // batch_size)
        total = nb * world * batch_size
    else:
        raise ValueError(f"loader.last_batch must be 'pad' or 'drop', got {last_batch!r}")
    pos = np.arange(total)
    ids = order[pos % n]
    pad = pos >= n
    mine = slice(rank, total, world)
    ids, pos, pad = ids[mine], pos[mine], pad[mine]
    return [[(int(ids[j]), int(pos[j]), bool(pad[j])) for j in range(b * batch_size, (b + 1) * batch_size)]
            for b in range(nb)]
