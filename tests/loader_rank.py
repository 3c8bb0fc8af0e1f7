"""Run as `python -m tests.loader_rank ROOT RANK WORLD OUT [last_batch]`: one rank of a
multi-process loader test, with 2 DataLoader workers; writes the keys it saw per epoch."""
import json
import sys

from ctvlp_dist.config import LoaderConfig
from ctvlp_dist.data import CTLoader


def main(root, rank, world, out, last_batch="pad"):
    cfg = LoaderConfig(batch_size=2, num_workers=2, seed=7, crop=(8, 16, 16), last_batch=last_batch)
    loader = CTLoader(root, cfg, split="train", rank=int(rank), world_size=int(world))
    epochs = []
    for _ in range(2):
        seen = []
        for b in loader:
            seen.append([[k, bool(p)] for k, p in zip(b.key, b.is_pad.tolist())])
        epochs.append(seen)
    json.dump(epochs, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
