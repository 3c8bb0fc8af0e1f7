"""`python -m launcher.nodes wait --nodes N --timeout S [--watch-pid P]`: block until N nodes have
joined the job's Ray cluster (RAY_ADDRESS, with the job's token), or fail saying which are
missing; at once if process P (the head node's `ray start` step) has ended."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_nodes(count: int, timeout: float, address: str | None = None, watch_pid: int | None = None) -> list[dict]:
    """The alive nodes once there are `count` of them; TimeoutError after `timeout` seconds, or
    RuntimeError as soon as `watch_pid` has ended."""
    import ray

    address = address or os.environ["RAY_ADDRESS"]
    deadline, last = time.time() + timeout, "no connection to the head yet"
    while time.time() < deadline:
        if not _alive(watch_pid):
            raise RuntimeError("the head node's Ray exited before every node joined")
        if not ray.is_initialized() and not _listening(address):  # ray.init would block on a head not up yet
            time.sleep(1.0)
            continue
        try:
            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            nodes = alive_nodes()
            if len(nodes) >= count:
                return nodes
            last = f"{len(nodes)} of {count} joined: {sorted(n['NodeManagerAddress'] for n in nodes)}"
        except (ConnectionError, RuntimeError) as e:  # the head is still starting
            last = f"no connection to the head yet ({str(e).splitlines()[0][:200]})"
        time.sleep(1.0)
    raise TimeoutError(f"Ray nodes not ready after {timeout:.0f} s: {last}; raise launch.node_wait_s if nodes are "
                       "slow to start")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.nodes", description=__doc__)
    p.add_argument("action", choices=["wait"])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--watch-pid", type=int, default=None, help="fail at once when this process has ended")
    args = p.parse_args(argv)
    try:
        nodes = wait_for_nodes(args.nodes, args.timeout, watch_pid=args.watch_pid)
    except (TimeoutError, RuntimeError) as e:
        print(f"[ctvlp] error: {e}. Each node's `ray start` log: <launch.output>/<job id>/ray-node-<index>.log",
              file=sys.stderr)
        return 1
    print(f"[ctvlp] {len(nodes)} Ray nodes up: {sorted(n['NodeManagerAddress'] for n in nodes)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
