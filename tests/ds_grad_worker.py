"""One rank of the DeepSpeed gradient test (run by torchrun from test_train_engine.py).

Every rank builds the same CT-CLIP (real towers, GroupNorm, dropout off), takes its slice of one
global batch and runs one real training step of `ctvlp_dist.train.step` on a real DeepSpeed
engine with SGD(lr=LR): the weight change over LR is the gradient DeepSpeed applied, after its
averaging over ranks (LR is large so that ZeRO's fp32 master weights round the change, not the
gradient). The reference is the plain full-batch gradient of the same
objective, computed in this process before torch.distributed exists (one process, no DeepSpeed).
After the step, the weights are exported (ZeRO-3 partitions gathered) to OUT.safetensors and the
trained engine's embeddings of the batch saved to OUT.emb.safetensors, for the reload test.
usage: ds_grad_worker.py STAGE MICRO ZERO DTYPE OUT.json   (STAGE clip | supervised | fvlm; DTYPE float64 |
float32 | bfloat16)
"""
import contextlib
import json
import sys
from types import SimpleNamespace

import torch

from ctvlp_dist.config import ModelConfig, OptimConfig
from ctvlp_dist.data.batch import CTBatch
from ctvlp_dist.models import CTCLIP
from ctvlp_dist.train.ds_config import deepspeed_config
from ctvlp_dist.train.loop import mean_and_max
from ctvlp_dist.train.objectives import clip_objective, supervised_objective
from ctvlp_dist.train.step import STAGES

B = 8  # global batch
LR = 1024.0  # a power of two: dividing by it is exact (2**20 under bf16, whose module weights keep 8 bits)


def main():
    stage, micro, zero, dtype_name, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    bf16 = dtype_name == "bfloat16"  # DeepSpeed bf16: the reference and the weights given to it stay fp32
    dtype = torch.float32 if bf16 else getattr(torch, dtype_name)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    fvlm = stage == "fvlm"  # two organs from layers 2-4, organ texts, masks with cut and absent organs
    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, channels_last=False, latent_dim=32, num_labels=18,
                      text_max_length=32, anatomies=["lung", "heart"] if fvlm else [], organ_width=8, organ_heads=2)
    model = CTCLIP(cfg).to(dtype).eval()  # eval: dropout off; GroupNorm is the same in both modes
    tc = SimpleNamespace(uncertain="ignore", aux_weight=0.5, text_bce=True, zero_stage=zero, precision="bf16" if bf16 else "fp32",
                         use_gpu=False, aux_text=True, group_identical_texts=False, fvlm_drop_cut=True,
                         fvlm_global_weight=0.5)
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(B, 1, 8, 16, 16, generator=g).to(dtype)
    reports = [f"Report {i}: {'nodule' if i % 3 else 'no effusion'} in the {'right' if i % 2 else 'left'} lung."
               for i in range(B)]
    labels = torch.randint(0, 2, (B, 18), generator=g).to(dtype)

    anat = torch.zeros(B, 1, 8, 16, 16, dtype=torch.uint8)
    anat[:, 0, 2:6, 3:9, 2:7] = 1  # lung: inside
    anat[:, 0, 3:7, 9:14, 8:13] = 2  # heart: inside
    anat[[1, 6], 0, 0, 9:14, 8:13] = 2  # heart cut by the crop in samples 1 and 6
    anat[3, 0][anat[3, 0] == 1] = 0  # no lung in sample 3
    normal = torch.tensor([[i % 3 == 0, i % 2 == 0] for i in range(B)])
    organ_text = [["Lung shows no significant abnormalities." if normal[i, 0] else ("A nodule." if i % 2 else "Effusion."),
                   "Heart shows no significant abnormalities." if normal[i, 1] else "Cardiomegaly."] for i in range(B)]
    meta = [{"mask_labels": {"lung": 1, "heart": 2}} for _ in range(B)]

    # reference: one process, the whole batch, plain autograd
    tok = model.text.tokenize(reports)
    if fvlm:
        from ctvlp_dist.models.anatomy import organ_masks
        from ctvlp_dist.train.fvlm import counted_organs, fvlm_loss, organ_groups, organ_validity

        m = organ_masks(anat, [1, 2])
        valid = organ_validity(m, True)
        assert valid.sum() == 2 * B - 3
        ftok = model.text.tokenize([t for r, ts in zip(reports, organ_text) for t in [r, *ts]])
        loss = fvlm_loss(model("organs", (vol, m)), model("text", ftok).view(B, 3, -1), model("scale"), valid,
                         organ_groups(organ_text, normal), counted_organs(valid, normal), tc.fvlm_global_weight)
    elif stage == "clip":
        loss = clip_objective(model, model("image", vol), model("text", tok), labels, tc.aux_weight)
    else:
        loss = supervised_objective(model, vol, labels, tc.uncertain, tok)
    ref = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()),
                                                                                  allow_unused=True)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = B // world
    accum = per_rank // micro
    ds = deepspeed_config(tc, OptimConfig(grad_clip=0.0), micro, accum)
    ds["zero_allow_untested_optimizer"] = True
    lr = 2.0 ** 20 if bf16 else LR
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), config=ds)
    rows = range(rank * per_rank, (rank + 1) * per_rank)
    batches = [CTBatch(volume=vol[list(rows[i:i + micro])], report=[reports[j] for j in rows[i:i + micro]],
                       key=[str(j) for j in rows[i:i + micro]], labels=labels[list(rows[i:i + micro])],
                       anatomy=anat[list(rows[i:i + micro])], meta=[meta[j] for j in rows[i:i + micro]],
                       organ_text=[organ_text[j] for j in rows[i:i + micro]] if fvlm else None,
                       organ_normal=normal[list(rows[i:i + micro])] if fvlm else None)
               for i in range(0, per_rank, micro)]
    timer = lambda phase: contextlib.nullcontext()  # noqa: E731
    # what the loop logs: the mean over ranks of what each rank's step returns
    got_loss, _ = mean_and_max(STAGES[stage](engine, batches, tc, timer, model.text.tokenize))

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        applied = {n: (before[n] - p.detach()).double() / lr for n, p in params.items()}
    from pathlib import Path

    from safetensors.torch import save_file

    from ctvlp_dist.train.checkpoint import export_model

    export_model(engine, SimpleNamespace(model=cfg), Path(out).with_suffix(".safetensors"), {"stage": stage})
    with torch.no_grad():  # collective under ZeRO-3: every rank runs the forward
        mdtype = next(engine.module.parameters()).dtype
        emb = {"image": engine.module("image", vol.to(mdtype)), "text": engine.module("text", tok)}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in emb.items()}, str(Path(out).with_suffix(".emb.safetensors")))
        errs = {}
        for n, r in ref.items():
            r = torch.zeros_like(before[n]) if r is None else r
            errs[n] = [float((applied[n] - r.double()).norm()), float(r.double().norm())]
        json.dump({"loss": got_loss, "ref_loss": float(loss), "errs": errs, "accum": accum}, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
