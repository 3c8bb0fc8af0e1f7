"""Throughput and cost accounting, and the Prometheus exporter (127.0.0.1 by default)."""
from __future__ import annotations

import time


class Accounting:
    def __init__(self, backend: str, metrics_port: int = -1, metrics_addr: str = "127.0.0.1"):
        self.t0 = time.perf_counter()
        self.t_first = self.t_last = None
        self.n_first = 0
        self.ok = self.failed = self.tokens_in = self.tokens_out = self.worker_restarts = 0
        self.backend = backend
        self.port = None
        self._m = None
        if metrics_port >= 0:
            self._start_metrics(metrics_port, metrics_addr)

    def _start_metrics(self, port: int, addr: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from ..prometheus import start_exporter

        reg = CollectorRegistry()
        self._m = {
            "reports": Counter("ctvlp_label_reports", "Reports labelled", ["status"], registry=reg),
            "tokens": Counter("ctvlp_label_tokens", "Tokens processed", ["kind"], registry=reg),
            "restarts": Counter("ctvlp_label_worker_restarts", "Engine workers that died and were restarted", registry=reg),
            "latency": Histogram("ctvlp_label_seconds_per_report", "Engine seconds per report", registry=reg,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)),
            "rate": Gauge("ctvlp_label_reports_per_second", "Reports per second so far", registry=reg),
        }
        self.port, self._server = start_exporter(reg, port, addr, "label.metrics_port")

    def add(self, rows: list[dict]) -> None:
        now = time.perf_counter()
        if rows and self.ok + self.failed == 0:
            self.t_first, self.n_first = now, len(rows)  # steady state starts after engines are up
        self.t_last = now
        for r in rows:
            ok = r.get("status") == "ok"
            self.ok += ok
            self.failed += not ok
            self.tokens_in += int(r.get("tokens_in", 0))
            self.tokens_out += int(r.get("tokens_out", 0))
            if self._m:
                self._m["reports"].labels("ok" if ok else "failed").inc()
                self._m["tokens"].labels("prompt").inc(int(r.get("tokens_in", 0)))
                self._m["tokens"].labels("generated").inc(int(r.get("tokens_out", 0)))
                if "engine_seconds" in r:
                    self._m["latency"].observe(r["engine_seconds"])
        if self._m:
            self._m["rate"].set(self.ok / max(1e-9, time.perf_counter() - self.t0))

    def restart(self) -> None:
        self.worker_restarts += 1
        if self._m:
            self._m["restarts"].inc()

    def summary(self, *, device: str, workers: int, devices_per_worker: int, price_per_device_hour: float) -> dict:
        dt = time.perf_counter() - self.t0
        n = self.ok + self.failed
        rps = n / dt if dt > 0 else 0.0
        device_hours = dt / 3600 * workers * devices_per_worker
        steady = 0.0
        if self.t_first is not None and self.t_last > self.t_first:
            steady = (n - self.n_first) / (self.t_last - self.t_first)
        rate = steady or rps
        per_50k_h = (50_000 / rate / 3600 * workers * devices_per_worker) if rate else float("inf")
        return {"backend": self.backend, "device": device, "workers": workers, "reports": n, "ok": self.ok,
                "failed": self.failed, "seconds": round(dt, 2), "reports_per_s": round(rps, 3),
                "steady_reports_per_s": round(steady, 3),
                "startup_seconds": round(self.t_first - self.t0, 2) if self.t_first is not None else None,
                "prompt_tokens_per_s": round(self.tokens_in / dt, 1) if dt else 0.0,
                "generated_tokens_per_s": round(self.tokens_out / dt, 1) if dt else 0.0,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "device_hours": round(device_hours, 5), "device_hours_per_50k_reports": round(per_50k_h, 3),
                "cost_usd_per_50k_reports": round(per_50k_h * price_per_device_hour, 2),
                "price_per_device_hour_usd": price_per_device_hour, "worker_restarts": self.worker_restarts,
                "metrics_port": self.port}

    def close(self) -> None:
        if getattr(self, "_server", None):
            self._server.shutdown()
