"""Ordered parallel map with a bounded number of tasks in flight, so memory stays flat.

`Pool.imap` queues every input at once; here at most `in_flight` results exist at a time,
which is what lets a 69k-patient cohort stream through a 2-core machine.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _init_worker():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, in_flight: int = 0) -> Iterator[R]:
    if workers <= 1:
        yield from map(fn, items)
        return
    in_flight = in_flight or 2 * workers
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as ex:
        pending: deque = deque()
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
