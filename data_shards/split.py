"""Patient-level train/val/test split: a patient's scans never straddle two splits."""
from __future__ import annotations

import numpy as np


def assign_splits(patients, fractions: dict[str, float], seed: int = 0) -> dict[str, str]:
    """Deterministic for (set of patients, fractions, seed), independent of input order.

    Counts are rounded so every non-zero fraction gets at least one patient when possible.
    """
    uniq = sorted(set(patients))
    names = list(fractions)
    frac = np.array([fractions[n] for n in names], dtype=float)
    if (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative and sum > 0, got {fractions}")
    frac = frac / frac.sum()
    n = len(uniq)
    counts = np.floor(frac * n).astype(int)
    for i in np.argsort(-(frac * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    # Guarantee a patient for every requested split once there are enough patients.
    for i in range(len(names)):
        if frac[i] > 0 and counts[i] == 0 and n >= len(names):
            j = int(np.argmax(counts))
            counts[j] -= 1
            counts[i] += 1
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, c in zip(names, counts):
        for k in order[start:start + c]:
            out[uniq[k]] = name
        start += c
    return out
