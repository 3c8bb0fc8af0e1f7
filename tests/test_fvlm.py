"""fVLM's parts against direct re-implementations: the per-organ pooling (a loop over samples
and organs, attention written out by hand) and the loss (its dense target matrix, fp64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ctvlp_dist.models.anatomy import AnatomyPool, organ_masks


def _loop_pool(pool: AnatomyPool, maps, masks):
    """Per sample and organ: the organ's positions (mask max-pooled to each grid), the layer
    projections, single-query multi-head attention from its formula, the organ's projection."""
    a = pool.attn
    w, h = a.embed_dim, a.num_heads
    hd = w // h
    Wq, Wk, Wv = a.in_proj_weight.split(w)
    bq, bk, bv = a.in_proj_bias.split(w)
    B, K = masks.shape[:2]
    out = torch.zeros(B, K, pool.out.shape[-1], dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            toks = []
            for m, proj in zip(maps, pool.proj):
                d, hh, ww = m.shape[2:]
                D, H, W = masks.shape[2:]
                sd, sh, sw = D // d, H // hh, W // ww
                for z in range(d):
                    for y in range(hh):
                        for x in range(ww):
                            if masks[b, k, z * sd:(z + 1) * sd, y * sh:(y + 1) * sh, x * sw:(x + 1) * sw].any():
                                toks.append(proj.weight @ m[b, :, z, y, x] + proj.bias)
            if not toks:  # an absent organ: no reference (the module attends everywhere; the loss masks it)
                continue
            T = torch.stack(toks)
            q = Wq @ pool.query[k] + bq
            keys, vals = T @ Wk.T + bk, T @ Wv.T + bv
            heads = []
            for i in range(h):
                s = slice(i * hd, (i + 1) * hd)
                att = torch.softmax(keys[:, s] @ q[s] / math.sqrt(hd), 0)
                heads.append(att @ vals[:, s])
            o = a.out_proj.weight @ torch.cat(heads) + a.out_proj.bias
            out[b, k] = o @ pool.out[k]
    return out


def test_organ_pooling_equals_a_loop_and_sees_only_its_organ():
    torch.manual_seed(0)
    B, K, D, H, W = 2, 3, 8, 16, 16
    maps = [torch.randn(B, 6, 4, 8, 8, dtype=torch.float64), torch.randn(B, 10, 2, 4, 4, dtype=torch.float64),
            torch.randn(B, 12, 1, 2, 2, dtype=torch.float64)]
    labels = torch.zeros(B, 1, D, H, W, dtype=torch.uint8)
    labels[0, 0, :3, :5, :6] = 1  # a small organ: a few positions per grid
    labels[0, 0, 4:, 8:, 8:] = 2
    labels[1, 0, 2:7, 3:12, 1:4] = 1
    labels[1, 0, 0, 0, 0] = 3  # one voxel: one position in each grid
    labels[1, 0, 5:, 10:, 10:] = 2
    masks = organ_masks(labels, [1, 2, 3])
    assert not masks[0, 2].any()  # organ 3 absent in sample 0: attends everywhere, finite
    pool = AnatomyPool([6, 10, 12], K, out_dim=5, width=16, heads=4).double()
    got = pool(maps, masks)
    assert got.shape == (B, K, 5) and torch.isfinite(got).all()
    present = masks.flatten(2).any(-1)
    want = _loop_pool(pool, maps, masks)
    assert torch.allclose(got[present], want[present], rtol=1e-10, atol=1e-12)
    # features outside an organ's positions do not move its embedding
    far = [m.clone() for m in maps]
    far[0][1, :, :, 6:, 6:] += 100.0  # sample 1, a corner where organ 1 (rows 3:12 -> grid 0:3) is absent
    moved = pool(far, masks)
    assert torch.allclose(moved[1, 0], got[1, 0], rtol=0, atol=1e-12) and not torch.allclose(moved[1, 1], got[1, 1])


# ---- the loss ----------------------------------------------------------------------------

B, K, DIM = 12, 3, 8
TEMPLATE = "{} shows no significant abnormalities."


def _batch(seed=0):
    """Features, per-organ texts with normal flags, and validity: organ 0 has normal and abnormal
    rows with repeated abnormal texts; organ 1 is normal everywhere (its term is skipped); organ 2's
    only abnormal row is cut (invalid), so it is skipped too."""
    g = torch.Generator().manual_seed(seed)
    zi = F.normalize(torch.randn(B, 1 + K, DIM, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(B, 1 + K, DIM, generator=g, dtype=torch.float64), dim=-1)
    normal = torch.zeros(B, K, dtype=torch.bool)
    normal[:, 0] = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    normal[:, 1] = True
    normal[:, 2] = True
    normal[4, 2] = False
    abn = ["A nodule.", "Effusion.", "A nodule.", "Emphysema.", "A nodule.", "Effusion.", "Consolidation."]
    texts, it = [], iter(abn)
    for i in range(B):
        texts.append([TEMPLATE.format("Lung") if normal[i, 0] else next(it), TEMPLATE.format("Heart"),
                      "Hernia." if not normal[i, 2] else TEMPLATE.format("Esophagus")])
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[[2, 9], 0] = False  # organ 0 cut in two samples (one repeated-nodule row among them)
    valid[4, 2] = False  # organ 2's only abnormal instance is cut
    return zi, zt, texts, normal, valid


def _dense_fvlm(zi, zt, scale, texts, normal, valid, global_weight):
    """fVLM's loss from its definition: per organ, over intact rows, P_ij = 1 when i = j, both
    normal, or identical texts; soft targets P / row sums; soft CE both ways, averaged; the organ
    counts only with an intact abnormal row; summed; + the report-level CLIP term."""
    total = zi.new_zeros(())
    for k in range(normal.shape[1]):
        rows = [i for i in range(len(texts)) if valid[i, k]]
        if not any(not normal[i, k] for i in rows):
            continue
        P = torch.tensor([[float(i == j or (normal[i, k] and normal[j, k]) or texts[i][k] == texts[j][k])
                           for j in rows] for i in rows], dtype=torch.float64)
        T = P / P.sum(1, keepdim=True)
        S = scale * zi[rows, 1 + k] @ zt[rows, 1 + k].T
        ce_r = -(T * torch.log_softmax(S, 1)).sum(1)
        ce_c = -(T * torch.log_softmax(S.T, 1)).sum(1)  # P is symmetric, so are its row sums per group
        total = total + 0.5 * (ce_r.mean() + ce_c.mean())
    if global_weight:
        S = scale * zi[:, 0] @ zt[:, 0].T
        y = torch.arange(len(texts))
        total = total + global_weight * 0.5 * (F.cross_entropy(S, y) + F.cross_entropy(S.T, y))
    return total


@pytest.mark.parametrize("global_weight", [0.0, 0.5])
def test_fvlm_loss_against_its_dense_target_matrix(global_weight):
    from ctvlp_dist.train.fvlm import counted_organs, fvlm_loss, organ_groups

    zi, zt, texts, normal, valid = _batch()
    scale = torch.tensor(11.0, dtype=torch.float64)
    counted = counted_organs(valid, normal)
    assert counted == [True, False, False]
    a, b = zi.clone().requires_grad_(), zt.clone().requires_grad_()
    terms = {}
    got = fvlm_loss(a, b, scale, valid, organ_groups(texts, normal), counted, global_weight, terms=terms)
    got.backward()
    ra, rb = zi.clone().requires_grad_(), zt.clone().requires_grad_()
    want = _dense_fvlm(ra, rb, scale, texts, normal, valid, global_weight)
    want.backward()
    assert set(terms) == ({0, "global"} if global_weight else {0})
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert torch.allclose(a.grad, ra.grad, rtol=1e-10, atol=1e-14) and torch.allclose(b.grad, rb.grad, rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(a.grad[[2, 9], 1]) == 0 and torch.count_nonzero(a.grad[:, 2:]) == 0


def _rank(rank, init, out):
    import torch.distributed as dist

    from ctvlp_dist.train.fvlm import counted_organs, fvlm_loss, organ_groups

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    zi, zt, texts, normal, valid = _batch()
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    a, b = zi[rows].clone().requires_grad_(), zt[rows].clone().requires_grad_()
    counted = counted_organs(valid[rows], normal[rows])
    loss = fvlm_loss(a, b, torch.tensor(11.0, dtype=torch.float64), valid[rows], organ_groups(texts[rows], normal[rows]),
                     counted, 0.5)
    loss.backward()
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad, "counted": torch.tensor(counted)},
               f"{out}/r{rank}.pt")
    dist.destroy_process_group()


def test_fvlm_loss_on_two_gloo_ranks_equals_one_process(tmp_path):
    """Each rank passes its half; the skip rule is decided by the all-reduce; the loss is global
    on both ranks and each rank's feature gradients are world x the one-process ones (what
    DeepSpeed's averaging expects)."""
    import tempfile

    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(tempfile.mktemp(dir=tmp_path), str(tmp_path)), nprocs=2, join=True)
    zi, zt, texts, normal, valid = _batch()
    ra, rb = zi.clone().requires_grad_(), zt.clone().requires_grad_()
    want = _dense_fvlm(ra, rb, torch.tensor(11.0, dtype=torch.float64), texts, normal, valid, 0.5)
    want.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        rows = slice(r * B // 2, (r + 1) * B // 2)
        assert got["counted"].tolist() == [True, False, False]
        assert torch.allclose(got["loss"], want, rtol=1e-12)
        assert torch.allclose(got["ga"] / 2, ra.grad[rows], rtol=1e-10, atol=1e-14)
        assert torch.allclose(got["gb"] / 2, rb.grad[rows], rtol=1e-10, atol=1e-14)


def test_tiny_fvlm_run_learns_and_evaluates_per_organ(train_cohort, tmp_path):
    """The whole method on the synthetic cohort: rules split -> fvlm stage (local process,
    GradCache over 4 micro-batches) -> eval with per-organ AUCs. The 16 training scans are the
    same batch every step, so the summed loss must fall."""
    import json

    from ctvlp_dist.labels.split_run import run_split

    from .conftest import make_cfg, metric_rows, run_ctvlp

    data, labels = train_cohort
    split = tmp_path / "split.parquet"
    s = run_split(make_cfg(label=dict(reports=str(data), silver=str(labels), out=str(split))), progress=False)
    assert s["ok"] == s["reports_in"] == 20
    run = tmp_path / "run"
    run_ctvlp("train", "--config", "configs/fvlm_tiny_cpu.yaml", "--data", str(data), "--labels", str(labels),
              "--organ-texts", str(split), "--out", str(run), "--quiet")
    losses = [r["loss"] for r in metric_rows(run)]
    assert len(losses) == 8 and losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3])
    run_ctvlp("eval", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "eval"), "--split", "train",
              "eval.bootstrap=0", "--quiet")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    per = m["zero_shot"]["per_organ"]
    assert set(per) == {"lung", "heart", "aorta", "esophagus", "global"}
    assert len(per["lung"]["findings"]) == 11 and per["global"]["findings"] == ["Medical material", "Lymphadenopathy"]
    assert all(v["skipped_volumes"] == 0 for v in per.values())  # the crop holds the whole stored volume
    assert "### Per organ" in (tmp_path / "eval" / "report.md").read_text()
