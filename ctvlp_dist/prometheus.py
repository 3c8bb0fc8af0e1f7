"""Starting a Prometheus exporter: loopback by default, any free port with 0, a warning (not a
crash) when the port is taken."""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


def start_exporter(registry, port: int, addr: str, port_key: str) -> tuple[Optional[int], object]:
    """(bound port or None, server or None). port_key names the config key, for the warning."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
        return server.server_address[1], server
    except OSError as e:
        log.warning("Prometheus exporter not started on %s:%s (%s); set %s=0 for any free port", addr, port, e, port_key)
        return None, None
