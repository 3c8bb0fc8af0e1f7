"""One process's metrics endpoint: the catalog's metrics of its job kind in a registry of its own,
served on `metrics.addr` (loopback unless configured) at port 0 (any free) or `metrics.port` +
local rank, and announced in the run folder's discovery files."""
from __future__ import annotations

import atexit
import logging
import socket
from pathlib import Path
from typing import Optional

from . import catalog
from .discovery import advertised, write_target

log = logging.getLogger(__name__)


def node_address() -> str:
    """This node's address as the cluster resolves its host name (`metrics.addr: node`)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "0.0.0.0"


class Exporter:
    def __init__(self, mc, run: str | Path, part: str, stage: str, rank: int = 0, local_rank: int = 0):
        """mc: the `metrics` config section; part: train | label | ingest (catalog.PARTS)."""
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.m = catalog.build(self.registry, part)
        self.run = Path(run).resolve()
        self.job = mc.job or self.run.name
        self.labels = {"job": self.job, "rank": rank, "node": socket.gethostname(), "stage": stage}
        self.port = self._server = self.target = None
        if mc.port < 0:
            return
        from ..prometheus import start_exporter

        addr = node_address() if mc.addr == "node" else mc.addr
        self.port, self._server = start_exporter(self.registry, 0 if mc.port == 0 else mc.port + local_rank, addr,
                                                 "metrics.port")
        if self.port is not None:
            name = f"{self.job}-{stage}-rank{rank}"
            self.target = write_target(run, name, f"{advertised(addr)}:{self.port}", self.labels)
            atexit.register(self.close)  # a job that dies of an exception leaves no stale target

    def restore(self, totals: Optional[dict]) -> None:
        """Counters continue from a checkpoint's totals (`totals()` of the run before)."""
        for name, value in (totals or {}).items():
            m = self.m.get(name)
            if m is not None and catalog.BY_NAME[name].kind == "counter" and not catalog.BY_NAME[name].labels:
                m.inc(float(value))

    def totals(self) -> dict:
        """The unlabelled counters' values, for a checkpoint."""
        return {name: self.registry.get_sample_value(name) or 0.0 for name in self.m
                if catalog.BY_NAME[name].kind == "counter" and not catalog.BY_NAME[name].labels}

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.target is not None:
            self.target.unlink(missing_ok=True)
            self.target = None
