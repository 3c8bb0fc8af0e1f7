"""GradCache gives the plain full-batch gradients (fp64, CPU) to 1e-6, with the real towers:
the 3D ResNet-18 (GroupNorm; BatchNorm in eval mode) and the real all-MiniLM-L6-v2. With its
dropout active, the re-run replays each micro-batch's RNG exactly. BatchNorm statistics are
updated once."""
import pytest
import torch
import torch.nn.functional as F

from ctvlp_dist.config import ModelConfig
from ctvlp_dist.loss import clip_loss
from ctvlp_dist.models import CTCLIP
from ctvlp_dist.train import gradcache_step

B, MICRO = 6, 2


@pytest.fixture(scope="module")
def text_encoder():
    from ctvlp_dist.models import TextEncoder

    return TextEncoder(max_length=32)


def _model(norm, text_encoder):
    torch.manual_seed(0)
    cfg = ModelConfig(stem="k4s4", norm=norm, gn_groups=8, channels_last=False, latent_dim=32, num_labels=18)
    m = CTCLIP(cfg, text_encoder=text_encoder).double()
    m.zero_grad(set_to_none=True)  # the text encoder is shared between tests: no stale gradients
    return m


def _data(m):
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(B, 1, 8, 16, 16, generator=g, dtype=torch.float64)
    texts = [f"Report {i}: {'nodule' if i % 2 else 'no effusion'} in the right lung." for i in range(B)]
    labels = torch.randint(0, 2, (B, 18), generator=g).double()
    return vol, m.text.tokenize(texts), labels


def _loss(m, labels):
    def fn(zi, zt):
        aux = F.binary_cross_entropy_with_logits(m.classify(zi), labels) + \
            F.binary_cross_entropy_with_logits(m.classify(zt), labels)
        return clip_loss(zi, zt, m.scale(), impl="torch") + 0.5 * aux
    return fn


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _micro(vol, tok):
    micro = [slice(i, i + MICRO) for i in range(0, B, MICRO)]
    return [vol[s] for s in micro], [{k: v[s] for k, v in tok.items()} for s in micro]


def _compare(got, ref):
    """Per-parameter relative error < 1e-6. Some gradients are exactly zero in exact arithmetic
    (attention key biases: softmax ignores them) and hold only ~1e-17 of round-off; their
    denominator is floored at 1e-9 of the largest gradient norm."""
    assert set(got) == set(ref) and len(ref) > 100
    floor = 1e-9 * max(float(r.norm()) for r in ref.values())
    errs = {n: float((got[n] - ref[n]).norm()) / max(float(ref[n].norm()), floor) for n in ref}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-6, (worst, errs[worst], float(ref[worst].norm()), float(got[worst].norm()))


@pytest.mark.parametrize("norm,image_mode", [("gn", "train"), ("bn", "eval")])
def test_gradcache_equals_full_batch(norm, image_mode, text_encoder):
    """Dropout off (it cannot draw the same masks for one batch of 6 and three of 2)."""
    m = _model(norm, text_encoder)
    m.train()
    m.text.eval()
    if image_mode == "eval":
        m.image.eval()
    vol, tok, labels = _data(m)
    full = _loss(m, labels)(m.encode_image(vol), m.encode_text(tok))
    full.backward()
    ref = _grads(m)
    m.zero_grad(set_to_none=True)
    images, texts = _micro(vol, tok)
    loss = gradcache_step(m.encode_image, m.encode_text, images, texts, _loss(m, labels), modules=[m])
    assert abs(loss.item() - full.item()) < 1e-10
    _compare(_grads(m), ref)


def test_gradcache_replays_dropout(text_encoder):
    """Dropout on: GradCache equals the plain micro-batched forward with grad from the same seed,
    which holds only if the re-run draws exactly the masks of the first pass."""
    m = _model("gn", text_encoder)
    m.train()
    vol, tok, labels = _data(m)
    images, texts = _micro(vol, tok)
    torch.manual_seed(7)
    zi_parts, zt_parts = [], []
    for x, t in zip(images, texts):  # the order GradCache's first pass uses
        zi_parts.append(m.encode_image(x))
        zt_parts.append(m.encode_text(t))
    plain = _loss(m, labels)(torch.cat(zi_parts), torch.cat(zt_parts))
    plain.backward()
    ref = _grads(m)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = gradcache_step(m.encode_image, m.encode_text, images, texts, _loss(m, labels), modules=[m])
    assert abs(loss.item() - plain.item()) < 1e-10
    _compare(_grads(m), ref)


def test_batchnorm_statistics_updated_once(text_encoder):
    m = _model("bn", text_encoder)
    m.train()
    vol, tok, labels = _data(m)
    micro = [slice(i, i + MICRO) for i in range(0, B, MICRO)]
    bn = m.image.stem[1]
    # reference: plain micro-batched forwards, one BN update per micro-batch
    plain = _model("bn", text_encoder)
    plain.train()
    with torch.no_grad():
        for s in micro:
            plain.encode_image(vol[s])
    gradcache_step(m.encode_image, m.encode_text, [vol[s] for s in micro],
                   [{k: v[s] for k, v in tok.items()} for s in micro], _loss(m, labels), modules=[m])
    assert int(bn.num_batches_tracked) == len(micro)  # not 2x
    ref_bn = plain.image.stem[1]
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-12)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-12)
