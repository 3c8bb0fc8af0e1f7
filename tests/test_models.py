"""Model layout and wiring: r3d-18 shapes per stem, the conv op entry point, the CLIP heads."""
import math

import pytest
import torch

from ctvlp_dist.config import ModelConfig, load_config
from ctvlp_dist.models import CTCLIP, ResNet3d18, register_conv3d


def _feature_maps(model, x):
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for layer in model.layers]
    model(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("stem,first", [("k2s2", (8, 16, 16)), ("k4s4", (4, 8, 8)), ("standard", (4, 8, 8))])
def test_r3d18_layout(stem, first):
    """Channels 64/128/256/512, strides 1/2/2/2 after the stem. The k2s2 numbers scale to issue 7's
    96x192x192 -> 48x96^2, 24x48^2, 12x24^2, 6x12^2."""
    m = ResNet3d18(stem=stem, norm="gn", gn_groups=8, channels_last=False)
    shapes = _feature_maps(m, torch.randn(1, 1, 16, 32, 32))
    expect = [(c, *(max(1, f // 2 ** i) for f in first)) for i, c in enumerate([64, 128, 256, 512])]
    assert shapes == expect
    assert m(torch.randn(2, 1, 16, 32, 32)).shape == (2, 512)
    assert 33.0e6 < sum(p.numel() for p in m.parameters()) < 33.3e6  # r3d-18 without its fc


def test_channels_last_and_batchnorm():
    m = ResNet3d18(stem="k2s2", norm="bn", channels_last=True)
    seen = []
    m.stem[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].is_contiguous(
        memory_format=torch.channels_last_3d)))
    assert isinstance(m.stem[1], torch.nn.BatchNorm3d)
    assert m(torch.randn(2, 1, 8, 16, 16)).shape == (2, 512)
    assert seen == [True]  # the input enters the stem in channels_last_3d (cuDNN keeps it)
    assert all(p.is_contiguous() for p in m.parameters())  # weights stay plain (DeepSpeed flattens them)


def test_convolutions_go_through_the_entry_point():
    calls = []

    def counting(x, w, b, stride, padding):
        calls.append(tuple(w.shape))
        return torch.nn.functional.conv3d(x, w, b, stride, padding)

    register_conv3d("counting", counting)
    m = ResNet3d18(stem="k4s4", norm="gn", gn_groups=8, channels_last=False, conv_impl="counting")
    m(torch.randn(1, 1, 8, 16, 16))
    assert len(calls) == sum(isinstance(x, torch.nn.Conv3d) for x in m.modules()) == 1 + 16 + 3


def test_clip_heads():
    class Tiny(torch.nn.Module):  # a stand-in text tower, to keep this test about the heads
        out_dim = 12

        def forward(self, tokens):
            return tokens

    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, channels_last=False, latent_dim=16, num_labels=18)
    m = CTCLIP(cfg, text_encoder=Tiny())
    assert m.image_proj.bias is None and m.text_proj.bias is None
    assert math.isclose(m.scale().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert math.isclose(m.scale().item(), 100.0, rel_tol=1e-6)  # clamped
    zi, zt = m.encode_image(torch.randn(3, 1, 8, 16, 16)), m.encode_text(torch.randn(3, 12))
    assert torch.allclose(zi.norm(dim=1), torch.ones(3)) and torch.allclose(zt.norm(dim=1), torch.ones(3))
    assert m.classify(zi).shape == m.classify(zt).shape == (3, 18)  # one classifier for both modalities


def test_model_variants_are_config_files():
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    assert load_config(root / "model_r3d18_seed.yaml").model.stem == "k2s2"
    lite = load_config(root / "model_r3d18_lite.yaml").model
    assert (lite.stem, lite.norm) == ("k4s4", "gn")


def test_text_tower_freezes_all_but_the_top_layers():
    from ctvlp_dist.models import TextEncoder

    t = TextEncoder(max_length=16, trainable_layers=2)
    trainable = {n.split(".")[2] for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == {"4", "5"}  # MiniLM-L6: layers 4 and 5 of 0-5
    assert not t.model.embeddings.word_embeddings.weight.requires_grad
    t.freeze_below(0)
    assert not any(p.requires_grad for p in t.model.parameters())


def test_frozen_text_tower_caches_features_without_dropout():
    """A fully frozen tower is a fixed feature extractor: cached features equal a fresh eval-mode
    pass (no dropout in train mode), repeats skip the encoder, new weights clear the cache."""
    import torch

    from ctvlp_dist.models import TextEncoder

    t = TextEncoder(max_length=32, trainable_layers=0).train()
    texts = ["No pleural effusion was observed.", "Cardiomegaly is present.", "No pleural effusion was observed."]
    calls = []
    t.model.register_forward_hook(lambda m, a, kw, o: calls.append(len(kw["input_ids"])), with_kwargs=True)
    first = t(t.tokenize(texts))
    assert not t.model.training and not first.requires_grad
    with torch.no_grad():
        ref = t._encode(t.tokenize(texts))
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
    calls.clear()
    again = t(t.tokenize(texts[::-1] + ["Heart size is normal."]))
    assert calls == [1]  # only the one new text reached the encoder
    torch.testing.assert_close(again[:3], first.flip(0))
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in t.state_dict().items()}
    t.load_state_dict(sd)
    assert not torch.allclose(t(t.tokenize(texts[:1])), first[:1])
