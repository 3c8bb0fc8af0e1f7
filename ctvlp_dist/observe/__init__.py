"""Observability: the metric catalog, per-process exporters announced by file-based service
discovery, vLLM's statistics re-exported, the Grafana dashboard, and `ctvlp observe`."""
from .catalog import METRICS
from .exporter import Exporter

__all__ = ["METRICS", "Exporter"]
