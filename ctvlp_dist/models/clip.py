"""CT-CLIP: image and text towers, bias-free projections to a shared latent, a learnable logit
scale (CLIP init 1/0.07, clamped) and the seed paper's classifier shared by both modalities."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .anatomy import AnatomyPool
from .resnet3d import ResNet3d18
from .text import TextEncoder


ORGAN_LAYERS = (2, 3, 4)  # the ResNet stages whose maps the organ queries attend over (fVLM: several depths)


class CTCLIP(nn.Module):
    def __init__(self, cfg, text_encoder: nn.Module | None = None, conv_tiles=None):
        super().__init__()
        self.image = ResNet3d18(cfg.stem, cfg.norm, cfg.gn_groups, cfg.channels_last, cfg.conv_impl, cfg.width,
                                conv_tiles)
        self.text = text_encoder if text_encoder is not None else TextEncoder(cfg.text_model, cfg.text_pooling,
                                                                             cfg.text_max_length,
                                                                             cfg.text_trainable_layers)
        self.image_proj = nn.Linear(self.image.out_dim, cfg.latent_dim, bias=False)
        self.text_proj = nn.Linear(self.text.out_dim, cfg.latent_dim, bias=False)
        # shape [1], not []: DeepSpeed's broadcast and ZeRO flattening view parameters as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.logit_scale_init)))
        self.max_log_scale = math.log(cfg.logit_scale_max)
        self.classifier = nn.Linear(cfg.latent_dim, cfg.num_labels) if cfg.num_labels else None
        # fVLM: one embedding per organ of model.anatomies, from layers 2-4 (None: no organs)
        self.organ_pool = None
        self.anatomies = list(cfg.anatomies)
        if cfg.anatomies:
            dims = [self.image.stage_dims[i - 1] for i in ORGAN_LAYERS]
            self.organ_pool = AnatomyPool(dims, len(cfg.anatomies), cfg.latent_dim, cfg.organ_width, cfg.organ_heads)

    def forward(self, kind: str, x=None) -> torch.Tensor:
        """One call for every part: model("image", volume), ("text", tokens), ("classify", z), ("scale"),
        ("organs", (volume, organ masks [B, K, D, H, W])) -> [B, 1 + K, latent]: the global image
        embedding, then one per organ.
        Stages call the model (or its DeepSpeed engine) only this way, so ZeRO-3 gathers the
        parameters each part needs, the root's own logit scale included."""
        if kind == "image":
            return self.encode_image(x)
        if kind == "text":
            return self.encode_text(x)
        if kind == "classify":
            return self.classify(x)
        if kind == "scale":
            return self.scale()
        if kind == "organs":
            return self.encode_organs(*x)
        raise ValueError(f"unknown model part {kind!r}: image | text | classify | scale | organs")

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp().squeeze(0)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image(volume)), dim=-1)

    def encode_organs(self, volume: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One image pass for both: the global embedding and the organs' ([B, 1 + K, latent])."""
        if self.organ_pool is None:
            raise RuntimeError("model.anatomies is empty: no organ embeddings (fVLM needs e.g. "
                               "model.anatomies=[lung,heart,aorta,esophagus])")
        pooled, maps = self.image(volume, features=ORGAN_LAYERS)
        z = torch.cat([self.image_proj(pooled)[:, None], self.organ_pool(maps, masks).to(pooled.dtype)], 1)
        return F.normalize(z, dim=-1)

    def encode_text(self, tokens: dict) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Shared classifier on either modality's latent (auxiliary BCE)."""
        if self.classifier is None:
            raise RuntimeError("model.num_labels=0: no classifier head")
        return self.classifier(z.to(self.classifier.weight.dtype))  # fp32 latents meet a bf16 head
