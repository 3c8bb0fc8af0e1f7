"""Benchmark records: device, date, versions and the exact command, always with the numbers."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path


def environment() -> dict:
    import numpy
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": gpu or f"CPU: {cpu} ({os.cpu_count()} cores)", "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton_version, "numpy": numpy.__version__,
            "platform": platform.platform(),
            # tile and variant overrides change what a kernel benchmark measured
            "env": {k: v for k, v in os.environ.items() if k.startswith("CTVLP_")}}


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
