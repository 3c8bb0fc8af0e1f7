"""Training: GradCache for huge contrastive batches (the engine, stages and checkpoints follow)."""
from .gradcache import gradcache_step

__all__ = ["gradcache_step"]
