"""Prometheus file-based service discovery for a run folder, and a Prometheus to scrape it.

Every exporting process writes one JSON file into `<run>/metrics/targets/` (a file each, so ranks
on many nodes never write the same file); one `file_sd_configs` entry whose pattern ends in
`*.json` then finds every rank of every job written there. The files' labels (`job`, `rank`,
`node`, `stage`) become the series' target labels; a file is removed when its process ends.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Optional


def targets_dir(run: str | Path) -> Path:
    return Path(run) / "metrics" / "targets"


def write_target(run: str | Path, name: str, address: str, labels: dict) -> Path:
    """One target file."""
    return _write(run, name, [{"targets": [address], "labels": {k: str(v) for k, v in labels.items()}}])


def _write(run: str | Path, name: str, groups: list[dict]) -> Path:
    """Atomically: Prometheus never reads half a file."""
    d = targets_dir(run)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(groups, indent=1))
    os.replace(tmp, path)
    return path


def advertised(addr: str) -> str:
    """The host others scrape: the bound address, or this node's name when bound to all."""
    return socket.gethostname() if addr in ("", "0.0.0.0", "::") else addr


def write_ray_targets(run: str | Path, job: str) -> Optional[Path]:
    """Ray's node metrics (each node's `--metrics-export-port`) beside ours, when this process is
    connected to a Ray cluster whose nodes export them."""
    import ray

    rows = [{"targets": [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"],
             "labels": {"job": job, "node": n.get("NodeManagerHostname") or n["NodeManagerAddress"], "stage": "ray"}}
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    return _write(run, f"{job}-ray-nodes", rows) if rows else None


def scrape_config(runs: list[str | Path], interval: str = "15s") -> str:
    """prometheus.yml text: one file_sd_configs entry per run folder. The folders it watches are
    made now: Prometheus watches a missing one only by polling, and finds its jobs late."""
    for r in runs:
        targets_dir(r).mkdir(parents=True, exist_ok=True)
    files = [str((targets_dir(r)).resolve() / "*.json") for r in runs]
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}", "scrape_configs:",
             "  - job_name: ctvlp", "    file_sd_configs:", "      - refresh_interval: 1s", "        files:"]
    lines += [f"          - {json.dumps(f)}" for f in files]
    return "\n".join(lines) + "\n"


def prometheus_binary() -> Optional[str]:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if Path(p).exists()), None)


def start_prometheus(config: Path, data: Path, port: int, addr: str = "127.0.0.1") -> subprocess.Popen:
    """Debian's prometheus in the foreground on loopback, against `config`; logs in data/prometheus.log."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed: apt-get install prometheus (Debian), or point any "
                                "Prometheus at the scrape configuration that `ctvlp observe RUN` prints")
    data.mkdir(parents=True, exist_ok=True)
    log = open(data / "prometheus.log", "ab")
    return subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
                             f"--web.listen-address={addr}:{port}", "--web.enable-lifecycle"],
                            stdout=log, stderr=subprocess.STDOUT)
