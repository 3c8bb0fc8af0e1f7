"""Distributed blockwise CLIP loss: 2 gloo processes give the same loss and the same
(averaged) gradients as one process on the whole batch, as DeepSpeed/DDP averaging sees them."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, B, D_IN, D = 2, 38, 10, 24  # b/world = 19 rows per rank: not a tile multiple


def _full_batch(grouped: bool, masked: bool = False):
    g = torch.Generator().manual_seed(1234)
    x_img = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    w_img = torch.randn(D, D_IN, generator=g, dtype=torch.float64)
    w_txt = torch.randn(D, D_IN, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 5, (B,), generator=g) if grouped else None
    valid = torch.rand(B, generator=g) > 0.3 if masked else None
    if masked:
        valid[B // WORLD:] = False  # rank 1 has no valid row: its columns still count for rank 0's rows
        valid[B // WORLD + 3] = True
    return x_img, x_txt, w_img, w_txt, groups, valid


def _model(w_img, w_txt, dtype):
    proj_i = torch.nn.Linear(D_IN, D, bias=False, dtype=torch.float64)
    proj_t = torch.nn.Linear(D_IN, D, bias=False, dtype=torch.float64)
    with torch.no_grad():
        proj_i.weight.copy_(w_img)
        proj_t.weight.copy_(w_txt)
    scale = torch.nn.Parameter(torch.tensor(7.5, dtype=torch.float64))
    return proj_i, proj_t, scale


def _features(proj_i, proj_t, x_img, x_txt, dtype):
    fi, ft = proj_i(x_img), proj_t(x_txt)
    fi = fi / fi.norm(dim=1, keepdim=True)
    ft = ft / ft.norm(dim=1, keepdim=True)
    return fi.to(dtype), ft.to(dtype)


def _worker(rank, init_file, impl, grouped, masked, dtype_name, out_dir):
    if impl == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from ctvlp_dist.loss import clip_loss

    dtype = getattr(torch, dtype_name)
    x_img, x_txt, w_img, w_txt, groups, valid = _full_batch(grouped, masked)
    proj_i, proj_t, scale = _model(w_img, w_txt, dtype)
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    fi, ft = _features(proj_i, proj_t, x_img[rows], x_txt[rows], dtype)
    loss = clip_loss(fi, ft, scale.to(torch.float64 if dtype == torch.float64 else torch.float32),
                     group_ids=None if groups is None else groups[rows], valid=None if valid is None else valid[rows],
                     impl=impl)
    loss.backward()
    grads = [p.grad for p in (proj_i.weight, proj_t.weight, scale)]
    for gr in grads:  # what DeepSpeed / DDP do with parameter gradients
        dist.all_reduce(gr)
        gr /= WORLD
    torch.save({"loss": loss.detach().double(), "grads": [g.clone() for g in grads]}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("impl,dtype,tol", [("torch", "float64", 1e-10), ("triton", "float32", 1e-5)])
@pytest.mark.parametrize("grouped,masked", [(False, False), (True, False), (True, True)])
def test_two_gloo_ranks_equal_one_process(impl, dtype, tol, grouped, masked, tmp_path):
    """masked: the `valid` row mask, with one rank's rows nearly all masked, equals one process
    on the batch without the masked pairs."""
    from kernels.contrastive import reference_clip_loss

    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(init, impl, grouped, masked, dtype, str(tmp_path)), nprocs=WORLD, join=True)
    x_img, x_txt, w_img, w_txt, groups, valid = _full_batch(grouped, masked)
    proj_i, proj_t, scale = _model(w_img, w_txt, torch.float64)
    if valid is not None:  # the reference never sees the masked pairs
        x_img, x_txt, groups = x_img[valid], x_txt[valid], groups[valid]
    fi, ft = _features(proj_i, proj_t, x_img, x_txt, torch.float64)
    ref = reference_clip_loss(fi, ft, scale, group_ids=groups)
    ref.backward()
    ref_grads = [proj_i.weight.grad, proj_t.weight.grad, scale.grad]
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert abs(got["loss"].item() - ref.item()) <= tol * abs(ref.item())
        for name, g, rg in zip(("w_img", "w_txt", "scale"), got["grads"], ref_grads):
            err = float((g.double() - rg).norm() / rg.norm())
            assert err < tol, f"rank {r} {name}: rel err {err:.2e}"
