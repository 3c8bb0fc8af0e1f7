"""Starting a Prometheus exporter: loopback by default, any free port with 0, a warning (not a
crash) when the port is taken.

It always answers in the Prometheus text format (0.0.4). prometheus_client's own server
negotiates OpenMetrics with Prometheus, and its OpenMetrics output escapes the colons of vLLM's
metric names (`vllm:prompt_tokens_total` arrives as `vllm_prompt_tokens_total`), so the names the
dashboard and vLLM's users query would never exist."""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

log = logging.getLogger(__name__)


def start_exporter(registry, port: int, addr: str, port_key: str) -> tuple[Optional[int], object]:
    """(bound port or None, server or None). port_key names the config key, for the warning."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):  # one line per scrape is noise
            pass

    try:
        server = ThreadingHTTPServer((addr, port), Handler)
    except OSError as e:
        log.warning("Prometheus exporter not started on %s:%s (%s); set %s=0 for any free port", addr, port, e, port_key)
        return None, None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ctvlp-metrics", daemon=True).start()
    return server.server_address[1], server
