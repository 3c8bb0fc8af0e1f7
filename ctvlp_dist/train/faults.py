"""Fault injection for the resume tests, kept out of the user's config.

The test harness sets CTVLP_TEST_FAIL_AT_STEP=N (and nothing else does): worker rank 1 then exits
before step N of a run that did not resume, once, so that Ray's FailureConfig restarts the group
from the last checkpoint. The launcher forwards the variable to its workers only when it is set."""
from __future__ import annotations

import logging
import os

ENV = "CTVLP_TEST_FAIL_AT_STEP"
log = logging.getLogger(__name__)


def forwarded_env() -> dict:
    """The variable for the workers' environment, when the harness set it."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}


def maybe_fail(next_step: int, rank: int, world: int, resumed: bool) -> None:
    at = int(os.environ.get(ENV) or 0)
    if at and next_step == at and rank == min(1, world - 1) and not resumed:
        log.error("%s=%d: worker rank %d exits now (fault injection)", ENV, at, rank)
        os._exit(1)
