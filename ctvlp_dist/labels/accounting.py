"""Throughput and cost accounting of a label job, and its metrics (observe/catalog.py) when it has
an exporter: reports, tokens, failures by reason, retries, queue depth, engine restarts, and the
engines' own vLLM statistics under vLLM's names."""
from __future__ import annotations

import time

from ..observe.catalog import FAILURE_REASONS, classify


class Accounting:
    def __init__(self, backend: str, exporter=None):
        self.t0 = time.perf_counter()
        self.t_first = self.t_last = None
        self.n_first = 0
        self.ok = self.failed = self.tokens_in = self.tokens_out = self.worker_restarts = self.retries = 0
        self.backend = backend
        self.ex = exporter
        self.vllm = None
        if exporter is not None:
            from ..observe.vllm_stats import VLLMCollector

            self.vllm = VLLMCollector()
            exporter.registry.register(self.vllm)

    @property
    def port(self):
        return self.ex.port if self.ex is not None else None

    def _m(self, name: str):
        return self.ex.m[name]

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
            if self.ex is not None:
                self._m("ctvlp_label_reports_total").labels("ok" if ok else "failed").inc()
                if not ok:
                    self._m("ctvlp_label_failures_total").labels(classify(str(r.get("status")), FAILURE_REASONS)).inc()
                self._m("ctvlp_label_tokens_total").labels("prompt").inc(int(r.get("tokens_in", 0)))
                self._m("ctvlp_label_tokens_total").labels("generated").inc(int(r.get("tokens_out", 0)))
                if "engine_seconds" in r:
                    self._m("ctvlp_label_seconds_per_report").observe(r["engine_seconds"])

    def restart(self) -> None:
        self.worker_restarts += 1
        if self.ex is not None:
            self._m("ctvlp_label_engine_restarts_total").inc()

    def retry(self) -> None:
        self.retries += 1
        if self.ex is not None:
            self._m("ctvlp_label_retries_total").inc()

    def queue(self, depth: int) -> None:
        if self.ex is not None:
            self._m("ctvlp_label_queue_depth").set(depth)

    def engine_stats(self, worker: int, snapshot: list[dict]) -> None:
        if self.vllm is not None:
            self.vllm.update(worker, snapshot)

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
                "retries": self.retries, "metrics_port": self.port}

    def close(self, linger_s: float = 0.0) -> None:
        if self.ex is not None:
            if linger_s > 0 and self.ex.port is not None:
                time.sleep(linger_s)  # one more scrape sees the final values
            self.ex.close()
