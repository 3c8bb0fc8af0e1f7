"""Stage objectives: uncertain-label policies and the masked BCE, against hand computation."""
import math

import pytest
import torch

from ctvlp_dist.train.objectives import label_targets, masked_bce

NAN = float("nan")


@pytest.mark.parametrize("policy,target,mask", [
    ("ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
    ("positive", [1, 0, 1, 0], [1, 1, 1, 0]),
    ("negative", [1, 0, 0, 0], [1, 1, 1, 0]),
])
def test_uncertain_policies(policy, target, mask):
    t, m = label_targets(torch.tensor([[1.0, 0.0, -1.0, NAN]]), policy)
    assert t.tolist() == [target] and m.tolist() == [[bool(x) for x in mask]]


def test_masked_bce_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]], requires_grad=True)
    loss = masked_bce(logits, torch.tensor([[1.0, 0.0, -1.0, NAN]]), "ignore")
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE(logit, 1) = softplus(-x); BCE(logit, 0) = softplus(x)
    assert loss.item() == pytest.approx((sp(-2.0) + sp(-1.0)) / 2)
    loss.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[0, 3] == 0  # masked entries get no gradient


def test_all_masked_is_zero_not_nan():
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = masked_bce(logits, torch.full((2, 3), NAN))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_bad_policy_is_an_error():
    with pytest.raises(ValueError, match="uncertain"):
        label_targets(torch.zeros(1, 1), "maybe")


def test_clip_objective_text_aux_and_identical_text_groups():
    """The hand-built loss: dense InfoNCE with identical texts as positives, plus the image-only
    BCE when aux_text is off (a sampled sentence does not carry the report's labels)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from ctvlp_dist.data.text import text_group_ids
    from ctvlp_dist.train.objectives import clip_objective

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Linear(8, 3)

        def forward(self, kind, x=None):
            return torch.tensor(5.0) if kind == "scale" else self.cls(x)

    torch.manual_seed(0)
    m = Heads()
    zi, zt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    texts = ["No effusion.", "Nodule.", "No effusion.", "Cardiomegaly."]
    same = torch.tensor([[float(a == b) for b in texts] for a in texts])
    logits = 5.0 * zi @ zt.T
    want_nce = 0.5 * (-(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                      - (same / same.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean())
    bce_i = F.binary_cross_entropy_with_logits(m.cls(zi), labels)
    bce_t = F.binary_cross_entropy_with_logits(m.cls(zt), labels)
    got = clip_objective(m, zi, zt, labels, 0.5, group_ids=text_group_ids(texts), aux_text=False)
    torch.testing.assert_close(got, want_nce + 0.5 * bce_i)
    both = clip_objective(m, zi, zt, labels, 0.5, group_ids=text_group_ids(texts))
    torch.testing.assert_close(both, want_nce + 0.5 * (bce_i + bce_t))
