"""Evaluation metrics against hand-computed cases and scikit-learn."""
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from ctvlp_dist.eval.metrics import bootstrap_macro_auc, closest_point_metrics, macro_auc, roc_auc, roc_curve
from ctvlp_dist.eval.retrieval import map_at_k, published_map_at_k, recall_at_k, streamed_topk


def test_auc_by_hand_with_a_tie():
    # positive-negative pairs: (.9,.1) 1, (.9,.4) 1, (.4,.1) 1, (.4,.4) 1/2 -> 3.5 / 4
    assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.4]) == 0.875
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_auc_and_roc_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.random(60), 1)  # many ties
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        fpr, tpr, thr = roc_curve(y, s)
        f2, t2, th2 = sk_roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, f2)
        np.testing.assert_allclose(tpr, t2)
        np.testing.assert_allclose(thr[1:], th2[1:])


def test_closest_point_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.05])
    # candidate thresholds: .9 (tpr 1/3, fpr 0), .8 (2/3, 0), .7 (2/3, 1/4), .3 (1, 1/4), ...
    # distances to (0,1): .8 -> 1/3; .3 -> 1/4 (closest)
    m = closest_point_metrics(y, s)
    assert m["threshold"] == 0.3
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 0, 3)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75 and m["precision"] == 0.75
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.3)) == pytest.approx(6 / 7)


def test_macro_auc_and_bootstrap():
    rng = np.random.default_rng(1)
    Y = rng.integers(0, 2, (200, 3))
    S = Y + rng.normal(0, 0.8, (200, 3))
    Y[:, 2] = 0  # one class only: left out of the macro
    m = macro_auc(Y, S)
    assert m == pytest.approx(np.mean([roc_auc_score(Y[:, j], S[:, j]) for j in range(2)]))
    ci = bootstrap_macro_auc(Y, S, resamples=200, seed=0)
    assert ci["low"] < m < ci["high"] and ci["resamples"] == 200
    assert ci == bootstrap_macro_auc(Y, S, resamples=200, seed=0)  # reproducible by seed


def test_streamed_topk_equals_dense_argsort():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(37, 8, generator=g), torch.randn(53, 8, generator=g)
    v, i = streamed_topk(q, gal, 10, block=7)  # several query and gallery blocks
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(gal, dim=1).T
    ref = torch.argsort(sim, dim=1, descending=True)[:, :10]
    assert torch.equal(i, ref)
    torch.testing.assert_close(v, torch.gather(sim, 1, ref))


def test_map_at_k_hand_made():
    """4 volumes at angles 0, 10, 30 and 60 degrees (strict cosine orders); labels over 2 findings.
    Volume 3 has no positive: it is a query but not in the gallery (0, 1, 2)."""
    ang = np.deg2rad([0, 10, 30, 60])
    emb = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1), dtype=torch.float32)
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    # orders over the gallery {0, 1, 2}: q0: 0,1,2  q1: 1,0,2  q2: 2,1,0  q3: 2,1,0
    # Jaccard with the query: q0 -> [1, 1/2, 0]; q1 -> [1, 1/2, 1/2]; q2 -> [1, 1/2, 0]; q3 -> [0, 0, 0]
    got = map_at_k(labels, emb, ks=(1, 2, 3))
    assert got[1] == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert got[2] == pytest.approx((0.75 + 0.75 + 0.75 + 0) / 4)
    assert got[3] == pytest.approx((0.5 + 2 / 3 + 0.5 + 0) / 4)
    pub = published_map_at_k(labels, emb, ks=(1, 2, 3))
    assert pub[1] == pytest.approx(got[1])  # the first K is right ...
    assert pub[2] == pytest.approx((got[1] + got[2]) / 2)  # ... later ones average over all K' <= K
    assert pub[3] == pytest.approx((got[1] + got[2] + got[3]) / 3)


def test_recall_at_k_known_ranks():
    # report i's own volume sits at rank r_i among the volumes: ranks 1, 2, 3, 1
    img = torch.eye(4)
    rep = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0.9, 0, 0.3, 0.5], [0, 0, 0, 1.0]])
    r = recall_at_k(rep, img, ks=(1, 2, 3, 4))
    assert r == {1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0}


def test_zero_shot_softmax_over_the_prompt_pair():
    from ctvlp_dist.eval.zero_shot import TEMPLATES, prompt_embeddings, zero_shot_scores

    seen = []

    def encode(texts):  # a stand-in text tower: records prompts, embeds "no"/"not" prompts on axis 1
        seen.extend(texts)
        return torch.tensor([[0.0, 1.0] if (" no " in t or "not" in t) else [1.0, 0.0] for t in texts])

    pos, neg = prompt_embeddings(encode, ["Cardiomegaly", "Emphysema"], ensemble=True)
    assert "There is Cardiomegaly." in seen and "not Emphysema." in seen and len(seen) == 2 * 2 * len(TEMPLATES)
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    s = zero_shot_scores(img, pos, neg, scale=10.0)
    # volume 0: cos(+) = 1, cos(-) = 0 -> softmax([10, 0])[0]; volume 1: softmax([6, 8])[0]
    expect0 = 1 / (1 + np.exp(-10.0))
    expect1 = 1 / (1 + np.exp(2.0))
    torch.testing.assert_close(s, torch.tensor([[expect0, expect0], [expect1, expect1]], dtype=torch.float32))
    prompt_embeddings(encode, ["Cardiomegaly"], ensemble=False, template=2)
    assert seen[-2:] == ["Cardiomegaly is present.", "Cardiomegaly is not present."]
