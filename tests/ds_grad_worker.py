"""One rank of the DeepSpeed gradient test (run by torchrun from test_train_engine.py).

Every rank builds the same CT-CLIP (real towers, GroupNorm, dropout off), takes its slice of one
global batch and runs one real training step of `ctvlp_dist.train.step` on a real DeepSpeed
engine with SGD(lr=LR): the weight change over LR is the gradient DeepSpeed applied, after its
averaging over ranks (LR is large so that ZeRO's fp32 master weights round the change, not the
gradient). The reference is the plain full-batch gradient of the same
objective, computed in this process before torch.distributed exists (one process, no DeepSpeed).
After the step, the weights are exported (ZeRO-3 partitions gathered) to OUT.safetensors and the
trained engine's embeddings of the batch saved to OUT.emb.safetensors, for the reload test.
usage: ds_grad_worker.py STAGE MICRO ZERO DTYPE OUT.json   (DTYPE float64 | float32 | bfloat16)
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
    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, channels_last=False, latent_dim=32, num_labels=18,
                      text_max_length=32)
    model = CTCLIP(cfg).to(dtype).eval()  # eval: dropout off; GroupNorm is the same in both modes
    tc = SimpleNamespace(uncertain="ignore", aux_weight=0.5, text_bce=True, zero_stage=zero, precision="bf16" if bf16 else "fp32",
                         use_gpu=False, aux_text=True, group_identical_texts=False)
    g = torch.Generator().manual_seed(1)
    vol = torch.randn(B, 1, 8, 16, 16, generator=g).to(dtype)
    reports = [f"Report {i}: {'nodule' if i % 3 else 'no effusion'} in the {'right' if i % 2 else 'left'} lung."
               for i in range(B)]
    labels = torch.randint(0, 2, (B, 18), generator=g).to(dtype)

    # reference: one process, the whole batch, plain autograd
    tok = model.text.tokenize(reports)
    if stage == "clip":
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
                       key=[str(j) for j in rows[i:i + micro]], labels=labels[list(rows[i:i + micro])])
               for i in range(0, per_rank, micro)]
    timer = lambda phase: contextlib.nullcontext()  # noqa: E731
    got_loss = STAGES[stage](engine, batches, tc, timer, model.text.tokenize)

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
