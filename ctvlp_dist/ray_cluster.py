"""Joining Ray: the cluster the SLURM launcher started (RAY_ADDRESS), else a private local one
bound to loopback."""
from __future__ import annotations

import logging
import os
from typing import Optional


def init_ray(address: Optional[str] = None, runtime_env: Optional[dict] = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, runtime_env=runtime_env)
