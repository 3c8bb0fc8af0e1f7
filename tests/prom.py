"""A real Prometheus server (Debian's, installed by `make observe-deps`) for the tests: it scrapes
run folders through their discovery files every second, and answers PromQL over HTTP."""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port


class Prometheus:
    def __init__(self, runs: list[Path], folder: Path):
        from ctvlp_dist.observe.discovery import prometheus_binary, scrape_config, start_prometheus

        if prometheus_binary() is None:
            pytest.skip("Debian's prometheus is not installed and `make observe-deps` could not install it "
                        "(not root and no sudo, or no apt): the scrape tests need a real server")
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(scrape_config(runs, "1s"))
        self.port = free_port()
        self.proc = start_prometheus(config, folder / "tsdb", self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"prometheus did not start: {(folder / 'tsdb' / 'prometheus.log').read_text()[-2000:]}")
        self.t0 = time.time()

    def _get(self, path: str, **params) -> list:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def range(self, expr: str, start: float | None = None, end: float | None = None) -> list:
        """Series of `expr` over the test's time (1 s steps)."""
        return self._get("/api/v1/query_range", query=expr, start=start or self.t0 - 5, end=end or time.time() + 1,
                         step="1")

    def values(self, expr: str) -> list[float]:
        return [float(v) for s in self.range(expr) for _, v in s["values"]]

    def wait_for(self, expr: str, timeout: float = 60) -> list:
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.range(expr)
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(f"no series for {expr} after {timeout} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


def dashboard_exprs(prefixes: tuple[str, ...]) -> list[str]:
    """The dashboard's expressions about these metrics, with the job variable as "any job"."""
    from ctvlp_dist.observe.dashboard import expressions

    return [e.replace("$job", ".*") for e in expressions() if any(p in e for p in prefixes)]
