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
