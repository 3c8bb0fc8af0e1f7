"""Reading shards: `build_loader` returns the torch `CTLoader` or the `DALILoader`; both yield `CTBatch`."""
from .batch import CTBatch
from .build import build_loader, resolve_backend
from .labels import LabelTable
from .loader import CTLoader, ShardIndex
from .plan import rank_batches

__all__ = ["CTBatch", "CTLoader", "ShardIndex", "LabelTable", "build_loader", "rank_batches", "resolve_backend"]
