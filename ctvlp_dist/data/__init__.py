"""Reading shards: `CTLoader` (CPU, torch DataLoader) yields `CTBatch`; the DALI loader will too."""
from .batch import CTBatch
from .labels import LabelTable
from .loader import CTLoader, ShardIndex
from .plan import rank_batches

__all__ = ["CTBatch", "CTLoader", "ShardIndex", "LabelTable", "rank_batches"]
