"""vLLM's engine statistics, re-exported by the label job under vLLM's own metric names.

The label engines are offline `vllm.LLM` actors with no `/metrics` of their own. Each actor returns
`snapshot(llm)` (plain dicts of `LLM.get_metrics()`) with its results; the driver's exporter holds
the latest snapshot per engine worker and serves it through `VLLMCollector`, with vLLM's labels
(`model_name`, `engine`) plus `worker`, the actor's index, since every actor's engine is "0".
"""
from __future__ import annotations

import threading


def snapshot(llm) -> list[dict]:
    """An engine's metrics as plain dicts (the driver need not import vLLM's classes)."""
    out = []
    for m in llm.get_metrics():
        d = {"name": m.name, "labels": dict(m.labels)}
        if hasattr(m, "buckets"):
            d.update(kind="histogram", buckets=dict(m.buckets), count=m.count, sum=m.sum)
        elif hasattr(m, "values"):
            continue  # speculative decoding's per-position vector: not used here
        else:
            d.update(kind="counter" if type(m).__name__ == "Counter" else "gauge", value=m.value)
        out.append(d)
    return out


class VLLMCollector:
    """A prometheus_client collector over the latest snapshot of each engine worker."""

    def __init__(self):
        self._latest: dict[int, list[dict]] = {}
        self._lock = threading.Lock()

    def update(self, worker: int, metrics: list[dict]) -> None:
        with self._lock:
            self._latest[worker] = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        families: dict = {}
        with self._lock:
            latest = {w: list(ms) for w, ms in self._latest.items()}
        for worker, metrics in sorted(latest.items()):
            for m in metrics:
                labels = {**m["labels"], "worker": str(worker)}
                keys = sorted(labels)
                key = (m["name"], m["kind"], tuple(keys))
                if key not in families:
                    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                           "histogram": HistogramMetricFamily}[m["kind"]]
                    families[key] = cls(m["name"], f"vLLM {m['name']} (re-exported by ctvlp)", labels=keys)
                fam, values = families[key], [labels[k] for k in keys]
                if m["kind"] == "histogram":
                    buckets = sorted(((b, v) for b, v in m["buckets"].items()), key=lambda bv: float(bv[0]))
                    fam.add_metric(values, buckets=[(b, float(v)) for b, v in buckets], sum_value=float(m["sum"]))
                else:
                    fam.add_metric(values, float(m["value"]))
        yield from families.values()
