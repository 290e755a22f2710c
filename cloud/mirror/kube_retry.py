"""Which Kubernetes failures are worth retrying, and the retry policy for writes the hub waits
on before acknowledging a report."""

from __future__ import annotations

import logging

import httpx2
import tenacity
import trio
from lightkube.core.exceptions import ApiError

log = logging.getLogger("cloud.mirror")

# Too many requests, conflicts from a concurrent writer, and the apiserver's own troubles.
TRANSIENT_CODES = frozenset({409, 429, 500, 502, 503, 504})


def transient(exc: BaseException, *, conflicts: bool = True) -> bool:
    if isinstance(exc, httpx2.TransportError):
        return True
    if not isinstance(exc, ApiError):
        return False
    return exc.status.code in TRANSIENT_CODES and (conflicts or exc.status.code != 409)


def retrying(max_wait_s: float = 10.0, *, conflicts: bool = True) -> tenacity.AsyncRetrying:
    """Retry transient failures without end (the caller's cancel scope ends it: a report is
    retried as long as its session lasts), with full-jitter backoff. ``conflicts=False`` for
    writes whose 409 is an answer (a failed precondition), not a race to retry."""
    return tenacity.AsyncRetrying(
        sleep=trio.sleep,
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=max_wait_s),
        retry=tenacity.retry_if_exception(lambda exc: transient(exc, conflicts=conflicts)),
        before_sleep=_log_retry,
        reraise=True,
    )


def _log_retry(state: tenacity.RetryCallState) -> None:
    # A write held back by retries holds its report's acknowledgement back too: say why.
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "Kubernetes write failed, retrying",
        extra={"attempt": state.attempt_number, "error": str(error)},
    )
