"""`ctvlp bench label`: reports/s and label quality of the vLLM backend on real dev reports.

Default: the real SmolLM2-135M-Instruct on CPU, each scoring method (yes/no next-token,
JSON value-token logprobs) on the first `bench.label_reports` dev reports, with macro AUC
against the hand labels. `--model-config llama-3.1-8b --dummy-weights` builds a model folder
with that architecture and random weights (vLLM load_format="dummy") for GPU throughput; it
borrows SmolLM2's tokenizer, so its vocabulary (49,152) is smaller than Llama 3.1's (128,256):
the transformer body, which dominates the cost, is the real size.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from ..records import markdown_table, write_result

DEV_REPORTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ctrate_reports_dev.csv"

MODEL_CONFIGS = {  # architecture only; weights are dummy
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny-llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048),
}


def dummy_model_folder(name: str, out: Path) -> Path:
    """A folder with `name`'s architecture, SmolLM2's tokenizer, and no weights."""
    from transformers import AutoConfig, AutoTokenizer

    from ..labels.model_prep import prepare_model

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown bench.model_config {name!r}; known: {sorted(MODEL_CONFIGS)}")
    base = prepare_model()
    cfg = AutoConfig.from_pretrained(str(base))
    for k, v in MODEL_CONFIGS[name].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.tie_word_embeddings = False
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def run(cfg, progress: bool = True, argv=None) -> dict:
    from ..labels.evaluate import evaluate_labels
    from ..labels.runner import run_label

    src = cfg.label.reports or str(DEV_REPORTS)
    rows = []
    keep = Path(cfg.bench.out)  # labels stay for inspection / re-evaluation
    keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctvlp-bench-label-") as tmp:
        model = cfg.label.model
        if cfg.bench.model_config:
            model = str(dummy_model_folder(cfg.bench.model_config, Path(tmp) / "model"))
        for scoring in cfg.bench.label_scorings:
            out = keep / f"labels-{cfg.bench.model_config or 'smollm2'}-{scoring}.parquet"
            if out.exists():
                out.unlink()  # a benchmark measures a fresh run, never a resume
            lc = dataclasses.replace(cfg.label, reports=src, out=str(out), backend="vllm", scoring=scoring, model=model,
                                     limit=cfg.bench.label_reports, load_format="dummy" if cfg.bench.dummy_weights else "auto")
            s = run_label(dataclasses.replace(cfg, label=lc), progress=progress)
            row = {"scoring": scoring, **{k: s[k] for k in ("reports", "ok", "failed", "reports_per_s", "steady_reports_per_s",
                                                             "startup_seconds", "prompt_tokens_per_s", "generated_tokens_per_s",
                                                             "device_hours_per_50k_reports", "cost_usd_per_50k_reports")}}
            if not cfg.bench.dummy_weights and Path(src).suffix == ".csv":
                ev = evaluate_labels(str(out), src)
                row.update(macro_auc=round(ev["macro_auc"], 4), macro_f1=round(ev["macro_f1"], 4))
            rows.append(row)
    payload = {"model": cfg.bench.model_config or cfg.label.model or "smollm2-135m-instruct",
               "dummy_weights": cfg.bench.dummy_weights, "reports_source": src, "rows": rows,
               "settings": {k: getattr(cfg.label, k) for k in ("engines", "batch_size", "tensor_parallel_size",
                                                                  "max_model_len", "dtype", "threads_per_engine")}}
    path = write_result(cfg.bench.results_dir, "label", payload, argv)
    cols = ["scoring", "reports", "ok", "steady_reports_per_s", "startup_seconds", "prompt_tokens_per_s",
            "generated_tokens_per_s", "cost_usd_per_50k_reports"] + (["macro_auc", "macro_f1"] if "macro_auc" in rows[0] else [])
    print(markdown_table(rows, cols))
    print(f"wrote {path}")
    return payload
