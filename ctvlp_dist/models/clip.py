"""CT-CLIP: image and text towers, bias-free projections to a shared latent, a learnable logit
scale (CLIP init 1/0.07, clamped) and the seed paper's classifier shared by both modalities."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet3d import ResNet3d18
from .text import TextEncoder


class CTCLIP(nn.Module):
    def __init__(self, cfg, text_encoder: nn.Module | None = None):
        super().__init__()
        self.image = ResNet3d18(cfg.stem, cfg.norm, cfg.gn_groups, cfg.channels_last, cfg.conv_impl)
        self.text = text_encoder if text_encoder is not None else TextEncoder(cfg.text_model, cfg.text_pooling,
                                                                             cfg.text_max_length)
        self.image_proj = nn.Linear(self.image.out_dim, cfg.latent_dim, bias=False)
        self.text_proj = nn.Linear(self.text.out_dim, cfg.latent_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.max_log_scale = math.log(cfg.logit_scale_max)
        self.classifier = nn.Linear(cfg.latent_dim, cfg.num_labels) if cfg.num_labels else None

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image(volume)), dim=-1)

    def encode_text(self, tokens: dict) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Shared classifier on either modality's latent (auxiliary BCE)."""
        if self.classifier is None:
            raise RuntimeError("model.num_labels=0: no classifier head")
        return self.classifier(z)
