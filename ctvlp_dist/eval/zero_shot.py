"""Zero-shot diagnosis: a finding's score is the softmax over a positive and a negative prompt.

Templates are the seed paper code's four pairs. With `ensemble`, each side's text embeddings are
averaged over the templates and renormalised (CLIP's prompt ensembling); otherwise one template
is used. Scores are P(positive prompt) = softmax(scale * [cos(v, t+), cos(v, t-)])[0].
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

TEMPLATES: tuple[tuple[str, str], ...] = (
    ("There is {f}.", "There is no {f}."),
    ("{f}.", "not {f}."),
    ("{f} is present.", "{f} is not present."),
    ("Findings are compatible with {f}.", "Findings are not compatible with {f}."),
)


def prompt_embeddings(encode_text: Callable[[list[str]], torch.Tensor], findings: Sequence[str],
                      templates: Sequence[tuple[str, str]] = TEMPLATES, ensemble: bool = True,
                      template: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive [F, d], negative [F, d]) unit text embeddings, one row per finding."""
    use = list(templates) if ensemble else [templates[template]]
    sides = []
    for side in (0, 1):
        per = [F.normalize(encode_text([t[side].format(f=f) for f in findings]).float(), dim=-1)
               for t in use]
        sides.append(F.normalize(torch.stack(per).mean(0), dim=-1))
    return sides[0], sides[1]


def zero_shot_scores(image_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """[N, F] probabilities that finding f is present in volume n."""
    v = F.normalize(image_emb.float(), dim=-1)
    logits = torch.stack([v @ pos.T, v @ neg.T], dim=-1) * scale
    return logits.softmax(-1)[..., 0]
