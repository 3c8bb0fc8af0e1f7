"""Entry point for torchrun and the deepspeed launcher:

    torchrun --nproc-per-node 2 -m ctvlp_dist.train.worker --config configs/train_tiny_cpu.yaml train.out=runs/x
    deepspeed --num_gpus 8 --module ctvlp_dist.train.worker --config configs/train_clip_seed.yaml

Both set RANK / WORLD_SIZE / MASTER_ADDR / LOCAL_RANK; checkpoints go to train.out/checkpoints.
"""
from __future__ import annotations

import argparse
import json

from ..config import config_to_dict, load_config
from .loop import run_worker
from .stop import EXIT_CODES


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ctvlp_dist.train.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    summary = run_worker(config_to_dict(cfg), sink="folder")
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(json.dumps(summary, indent=1))
    dist.destroy_process_group()
    if summary["stopped"]:  # a checkpointed stop on a signal: the job script requeues on EXIT_REQUEUE
        raise SystemExit(EXIT_CODES[summary["stopped"]])


if __name__ == "__main__":
    main()
