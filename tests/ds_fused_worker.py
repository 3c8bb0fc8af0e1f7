"""One rank of the ZeRO-3 test of the fused BN blocks (run by torchrun from test_train_engine.py).

ZeRO-3 gathers a module's parameters around that module's forward; a fused block (conv_impl
triton) reads its convolutions' and norms' parameters without calling their forwards. Every rank
trains the same tiny BN tower on the same batch (so DeepSpeed's averaging is the identity and BN's
batch statistics are the single-process ones) for two SGD steps at ZeRO-3 with no parameter kept
whole (persistence threshold 0). The reference is the same two steps in plain torch, in this
process before torch.distributed exists. The Triton kernels run in the interpreter.
usage: ds_fused_worker.py OUT.json
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from ctvlp_dist.models.resnet3d import ResNet3d18  # noqa: E402

LR, STEPS = 0.05, 2


def tower():
    torch.manual_seed(0)
    m = ResNet3d18("k4s4", "bn", 1, True, "triton", 4)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm3d):
            bn.weight.data.uniform_(0.5, 1.5)  # no zero-init: every branch carries gradient
    return m


def main():
    out = sys.argv[1]
    x = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = tower()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        ref(x).square().mean().backward()
        opt.step()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    world = int(os.environ["WORLD_SIZE"])
    m = tower()
    eng, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=LR), config={
        "train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    partitioned = sum(p.numel() == 0 for p in m.parameters())  # outside forward: released
    for _ in range(STEPS):
        eng.backward(eng(x).square().mean())
        eng.step()
    with deepspeed.zero.GatheredParameters(list(m.parameters())):
        errs = {n: float((p.detach() - r.detach()).norm() / r.detach().norm())
                for (n, p), r in zip(m.named_parameters(), ref.parameters())}
    if eng.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"errs": errs, "partitioned": partitioned, "params": len(errs)}, f)


if __name__ == "__main__":
    main()
