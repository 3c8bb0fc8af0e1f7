"""What the text tower sees of a report during training (`loader.text_view`), and which texts
count as the same (`text_group_ids`).

`report`: the whole report. `sentence`: one sentence of it, drawn per sample and epoch, as
CXR-CLIP's sentence sampling does. Short sentences carry one finding each, so the projection
learns the finding-level directions that zero-shot prompts ("There is no {f}.") rely on; over
the epochs every sentence of a report is paired with its volume. Evaluation (loader.train=false)
always sees the whole report.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from ..labels.rules import split_sentences

TEXT_VIEWS = ("report", "sentence")


def check_text_view(view: str) -> None:
    if view not in TEXT_VIEWS:
        raise ValueError(f"loader.text_view must be one of {TEXT_VIEWS}, got {view!r}")


def text_view(report: str, view: str, rng: np.random.Generator) -> str:
    check_text_view(view)
    if view == "report":
        return report
    sents = split_sentences(report)
    return sents[int(rng.integers(len(sents)))] + "." if sents else report


def text_group_ids(texts: Sequence[str]) -> torch.Tensor:
    """int64 id per text, equal for identical texts (a 64-bit hash, stable across ranks and runs):
    the contrastive loss treats pairs with equal ids as positives (fVLM's false-negative
    calibration), so a sentence shared by many reports is not a negative of its own copies."""
    ids = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts]
    return torch.tensor(ids, dtype=torch.int64)
