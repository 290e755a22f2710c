"""How long to wait before trying again: capped exponential backoff with full jitter, started
over once a connection has stayed up for a while.

Every reconnecting part of the edge waits this way (the hub client, the registry client, BLE,
MQTT, a device twin's probes); only the kubelet's CrashLoopBackOff, whose figures Kubernetes
defines, has its own.

- After the n-th consecutive failure the wait is a random time between 0 and
  ``min(cap_s, base_s * 2**(n - 1))`` ("full jitter"): clients that failed together, such as a
  fleet that lost the cloud at once, come back spread out rather than together.
- A connection that stayed up for ``stable_s`` starts the count over. One that comes up and
  drops at once keeps backing off, so a peer that accepts and then hangs up is not hammered at
  the base rate.

Sans-IO: ``Backoff`` is the policy (numbers only); ``Retries`` counts one connection's failures
under it. Neither reads a clock nor sleeps: callers pass ``now`` (any monotonic clock, in
seconds) and sleep the delay they are given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits from ``base_s`` doubling up to ``cap_s``; a connection up for ``stable_s`` resets
    them."""

    base_s: float
    cap_s: float
    stable_s: float = 30.0

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` consecutive failures (0 after none)."""
        if failures <= 0:
            return 0.0
        # The exponent is bounded so that a long outage cannot overflow the float.
        return min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 62))

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """A wait after ``failures`` consecutive failures, drawn from ``rng`` (default: the
        ``random`` module's generator) uniformly between 0 and ``ceiling(failures)``."""
        uniform = rng.uniform if rng is not None else random.uniform
        return uniform(0.0, self.ceiling(failures))

    def stable(self, up_for_s: float) -> bool:
        """Whether a connection that stayed up this long starts the count over."""
        return up_for_s >= self.stable_s


class Retries:
    """The consecutive failures of one connection under ``policy``.

    Call ``succeeded(now)`` when the connection is up and ``failed(now)`` when an attempt fails
    or the connection is lost; ``failed`` returns how long to wait before the next attempt.
    """

    def __init__(self, policy: Backoff, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.failures = 0
        self._rng = rng
        self._up_since: float | None = None

    def succeeded(self, now: float) -> None:
        self._up_since = now

    def failed(self, now: float) -> float:
        if self._up_since is not None and self.policy.stable(now - self._up_since):
            self.failures = 0
        self._up_since = None
        self.failures += 1
        return self.policy.delay(self.failures, self._rng)
