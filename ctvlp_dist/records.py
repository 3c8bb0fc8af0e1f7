"""Benchmark records: device, date, versions and the exact command, always with the numbers."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path


# The vector extensions that oneDNN (convolutions), MKL (matmuls) and ATen's own kernels dispatch
# on, and the variables that lower each library's choice.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_bf16", "asimd", "sve", "sve2")
ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """The CPU's model name and which of SIMD_FLAGS it has (x86 "flags", Arm "Features")."""
    name, flags = platform.processor() or "", set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, val = (part.strip() for part in line.partition(":"))
            if key == "model name":
                name = val
            elif key in ("flags", "Features"):
                flags = set(val.split())
                break  # the first processor's block; the others repeat it
    except OSError:
        pass
    return name, [f for f in SIMD_FLAGS if f in flags]


def environment() -> dict:
    """Where a number was taken. fp32 CPU sums round differently at each SIMD level, so a CPU
    training run is bit-reproducible only on the same vector extensions (`cpu_simd`) under the
    same ISA variables (`env`); `cpu_capability` is the level ATen's own kernels dispatch to."""
    import numpy
    import torch

    cpu, simd = cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": gpu or f"CPU: {cpu} ({os.cpu_count()} cores)", "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton_version, "numpy": numpy.__version__,
            "platform": platform.platform(), "cpu_simd": simd, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # tile and variant overrides change what a kernel benchmark measured; ISA caps what a CPU run computed
            "env": {k: v for k, v in os.environ.items() if k.startswith("CTVLP_") or k in ISA_VARS}}


def write_result(results_dir: str | Path, name: str, payload: dict, argv=None) -> Path:
    now = _dt.datetime.now(_dt.timezone.utc)
    rec = {"benchmark": name, "date": now.isoformat(timespec="seconds"), **environment(),
           "command": shlex.join(argv or sys.argv), **payload}
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    dev = "gpu" if "CPU" not in rec["device"] else "cpu"
    stem = f"{name}-{dev}-{now.strftime('%Y%m%dT%H%M%S')}"
    for i in range(1, 1000):  # two records in one second keep both ("x": never overwrite)
        path = d / (f"{stem}.json" if i == 1 else f"{stem}-{i}.json")
        try:
            with open(path, "x") as f:
                f.write(json.dumps(rec, indent=1) + "\n")
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{d}: 999 records named {stem}*.json already; write them to another bench.results_dir")


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)
