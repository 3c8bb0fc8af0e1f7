"""The engine's small parts against hand computation: lr schedule, weight-decay groups, the
counted FLOPs of the image tower (vs torch's FlopCounterMode), MFU, and the metrics exporters."""
import json
import math
import urllib.request
from pathlib import Path

import pytest
import torch

from ctvlp_dist.config import ModelConfig, OptimConfig
from ctvlp_dist.models.flops import conv_linear_flops, image_tower_train_flops
from ctvlp_dist.models.resnet3d import ResNet3d18
from ctvlp_dist.train.metrics import TrainMetrics
from ctvlp_dist.train.optim import build_optimizer, lr_factor, param_groups


def test_warmup_then_cosine_by_hand():
    f = [lr_factor(s, 10, "cosine", 2, 0.1) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0  # linear warmup over 2 steps
    assert f[2] == pytest.approx(1.0)  # cosine starts at the top ...
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # ... halfway at 4/8
    assert f[10] == pytest.approx(0.1)  # ... and ends at the floor
    assert lr_factor(5, 10, "constant", 0, 0.0) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, "linear", 0, 0.0)


def test_no_decay_on_norms_biases_and_logit_scale():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    m.register_parameter("logit_scale", torch.nn.Parameter(torch.zeros(1)))
    decay, rest = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.1
    assert len(rest["params"]) == 4 and rest["weight_decay"] == 0.0
    opt, sched = build_optimizer(m, OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine"), 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)  # step 0 of a 2-step warmup
    assert set(sched.state_dict()["lr_lambdas"][0]) == {"total", "schedule", "warmup", "min_ratio"}  # plain values


def test_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for stem in ("standard", "k2s2", "k4s4"):
        m = ResNet3d18(stem, "gn", 8, channels_last=False)
        x = torch.randn(1, 1, 16, 32, 32)
        with FlopCounterMode(display=False) as fc:
            m(x)
        assert conv_linear_flops(m, (1, 16, 32, 32)) == fc.get_total_flops()


def test_stem_flops_by_hand():
    """k4s4 stem on 16x32x32: 4x8x8 outputs x 64 channels x 4^3 taps x 2."""
    stem = torch.nn.Sequential(torch.nn.Conv3d(1, 64, 4, stride=4, bias=False))
    assert conv_linear_flops(stem, (1, 16, 32, 32)) == 2 * (4 * 8 * 8) * 64 * 64
    # the seed configuration at its crop: about 2.08 TFLOP per scan and training step
    assert image_tower_train_flops(ModelConfig(stem="k2s2"), (96, 192, 192)) == pytest.approx(2.0792e12, rel=1e-3)


def test_metrics_jsonl_prometheus_and_mfu(tmp_path):
    from ctvlp_dist.config import MetricsConfig
    from ctvlp_dist.observe import Exporter

    ex = Exporter(MetricsConfig(port=0), tmp_path, "train", "clip", rank=0)
    m = TrainMetrics(tmp_path, total_steps=2, start_step=0, world=2, flops_per_scan=10**12, peak_flops=100e12,
                     exporter=ex, progress=False)
    phases = {"data": 0.5, "forward": 1.0, "backward": 2.0, "optimizer": 0.5}
    row = m.record(1, 0, 1.25, 1e-4, 14.3, samples=16, phases=phases, loss_max=1.5, grad_norm=0.75)
    assert row["step_s"] == 4.0 and row["samples_per_s"] == 4.0 and row["scans_per_s_per_worker"] == 2.0
    assert row["mfu"] == pytest.approx(2 * 1e12 / 100e12)  # 2 scans/s x 1 TFLOP / 100 TFLOP/s
    m.checkpoint(0.25)
    body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10).read().decode()
    for line in ("ctvlp_train_loss 1.25", "ctvlp_train_loss_max 1.5", "ctvlp_train_grad_norm 0.75",
                 "ctvlp_train_samples_per_second 4.0", 'ctvlp_train_step_seconds{phase="backward"} 2.0',
                 "ctvlp_train_logit_scale 14.3", "ctvlp_train_samples_total 8.0", "ctvlp_train_mfu 0.02",
                 "ctvlp_train_tflops 2.0", "ctvlp_train_data_wait_ratio 0.125", "ctvlp_loader_wait_seconds_total 0.5",
                 "ctvlp_train_steps_total 1.0", "ctvlp_train_checkpoints_total 1.0",
                 "ctvlp_train_checkpoint_seconds_total 0.25", "ctvlp_train_ooms_total 0.0"):
        assert line in body, line
    assert "ctvlp_train_memory_max_active_bytes" in body
    target = json.loads(ex.target.read_text())
    assert target == [{"targets": [f"127.0.0.1:{m.port}"],
                       "labels": {"job": tmp_path.name, "rank": "0", "node": target[0]["labels"]["node"], "stage": "clip"}}]
    totals = ex.totals()
    m.close()
    ex.close()
    assert not ex.target and not list((tmp_path / "metrics" / "targets").iterdir())  # gone with the process
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [row]
    again = Exporter(MetricsConfig(port=-1), tmp_path, "train", "clip")  # a resumed run: counters continue
    again.restore(totals)
    assert again.port is None and again.totals() == totals and totals["ctvlp_train_steps_total"] == 1.0


def test_exporter_binds_loopback_by_default(tmp_path):
    from ctvlp_dist.config import MetricsConfig
    from ctvlp_dist.observe import Exporter

    ex = Exporter(MetricsConfig(), tmp_path, "train", "clip")
    try:
        assert ex._server.server_address[0] == "127.0.0.1"
    finally:
        ex.close()


def test_bench_train_parts_run_and_report():
    """Shape of the benchmark's records (its numbers live in benchmarks/results, not in tests)."""
    from ctvlp_dist.bench.train import bench_gradcache, bench_tower

    from .conftest import make_cfg

    cfg = make_cfg(model=dict(stem="k4s4", norm="gn", gn_groups=8, latent_dim=16, text_max_length=16))
    cpu = torch.device("cpu")
    t = bench_tower(cfg, (8, 16, 16), 2, cpu, torch.float32, reps=1)
    assert t["mfu"] is None and t["scans_per_s"] > 0 and t["tflops_per_scan"] == pytest.approx(
        image_tower_train_flops(cfg.model, (8, 16, 16)) / 1e12)
    g = bench_gradcache(cfg, (8, 16, 16), 4, 2, cpu, torch.float32, reps=1)
    assert g["batch"] == 4 and g["micro"] == 2 and g["ratio"] > 0 and g["theory"] == pytest.approx(4 / 3)


def test_init_from_an_export(tmp_path):
    from ctvlp_dist.models import CTCLIP, TextEncoder
    from ctvlp_dist.models.export import read_exported, save_exported
    from ctvlp_dist.train.loop import load_init

    text = TextEncoder(max_length=16)
    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, latent_dim=16, num_labels=18)
    torch.manual_seed(1)
    src = CTCLIP(cfg, text_encoder=text)
    path = save_exported(src.state_dict(), cfg, tmp_path / "m.safetensors", {"stage": "supervised"})
    sd, cfg2, extra = read_exported(path)
    assert cfg2 == cfg and extra == {"stage": "supervised"}
    torch.manual_seed(2)
    dst = CTCLIP(cfg, text_encoder=TextEncoder(max_length=16))
    load_init(dst, str(path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    other = CTCLIP(ModelConfig(stem="k4s4", norm="gn", gn_groups=8, latent_dim=32), text_encoder=text)
    with pytest.raises(ValueError, match="does not fit"):
        load_init(other, str(path))


def test_supervised_stage_keeps_unused_parameters_out_of_the_optimizer():
    from types import SimpleNamespace

    from ctvlp_dist.models import CTCLIP, TextEncoder
    from ctvlp_dist.train.loop import freeze_unused

    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, latent_dim=16)
    m = CTCLIP(cfg, text_encoder=TextEncoder(max_length=16))
    freeze_unused(m, SimpleNamespace(stage="supervised", text_bce=True, lock_image=False))
    assert all(p.requires_grad for p in m.parameters())  # the text tower is trained by text_bce
    freeze_unused(m, SimpleNamespace(stage="supervised", text_bce=False, lock_image=True))  # clip-only option
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"text", "text_proj", "logit_scale"}
    assert all(p.requires_grad for p in [*m.image.parameters(), *m.image_proj.parameters(), *m.classifier.parameters()])


def test_locked_image_tower_keeps_weights_and_statistics():
    """train.lock_image (LiT): a CLIP step moves the projections, never the tower or its BN."""
    from types import SimpleNamespace

    from ctvlp_dist.config import OptimConfig
    from ctvlp_dist.models import CTCLIP, TextEncoder
    from ctvlp_dist.train.loop import freeze_unused, set_bn_mode
    from ctvlp_dist.train.objectives import clip_objective
    from ctvlp_dist.train.optim import build_optimizer

    torch.manual_seed(0)
    m = CTCLIP(ModelConfig(stem="k4s4", norm="bn", width=8, latent_dim=16), text_encoder=TextEncoder(max_length=16))
    freeze_unused(m, SimpleNamespace(stage="clip", text_bce=False, lock_image=True))
    set_bn_mode(m, "train", lock_image=True)
    assert not m.image.training and m.image_proj.training and m.text.training
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt, _ = build_optimizer(m, OptimConfig(lr=1e-2), 1)
    vol, texts = torch.randn(4, 1, 16, 32, 32), ["a nodule", "no effusion", "cardiomegaly", "normal heart"]
    loss = clip_objective(m, m("image", vol), m("text", m.text.tokenize(texts)), torch.ones(4, 18), 1.0)
    loss.backward()
    opt.step()
    after = m.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert "image" not in moved and {"image_proj", "classifier"} <= moved  # BN buffers are in the state dict


def _shared_check_rank(rank: int, world: int, store: str, folders: list[str], result: str) -> None:
    import torch.distributed as dist

    from ctvlp_dist.train.loop import check_shared_storage

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = f"nodes={check_shared_storage(Path(folders[rank]), rank)}"
    except RuntimeError as e:
        out = f"error: {e}"
    Path(f"{result}.{rank}").write_text(out)
    dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_train_out_must_be_seen_by_every_rank(tmp_path, shared):
    """Two ranks (gloo, two processes). One host has one filesystem, so a node-local train.out is
    played by giving rank 1 another folder at the same place: both ranks must fail, saying what to do."""
    import torch.multiprocessing as mp

    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    folders = [str(a), str(a if shared else b)]
    mp.spawn(_shared_check_rank, args=(2, str(tmp_path / "store"), folders, str(tmp_path / "result")), nprocs=2)
    got = [(tmp_path / f"result.{r}").read_text() for r in range(2)]
    if shared:
        assert got == ["nodes=1", "nodes=1"] and not list(a.glob(".shared-check-*"))
    else:
        assert all(g.startswith("error: train.out=") and "rank(s) [1]" in g and "every node mounts" in g for g in got), got
