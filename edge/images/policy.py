"""``imagePullPolicy``: when the kubelet pulls, as Kubernetes defines it.

- ``Always``: resolve the reference with the registry every time a container starts (layers
  already stored are not downloaded again).
- ``IfNotPresent``: pull only when the store has no image under the reference.
- ``Never``: never pull; a missing image is ``ErrImageNeverPull``.

Left out, the policy is ``Always`` for ``:latest`` or an image without tag or digest, and
``IfNotPresent`` otherwise (a pinned tag or a digest).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edge.backoff import Backoff
from edge.images.errors import ImageNeverPullError
from edge.images.reference import Reference


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


def pull_policy(image: str, declared: str | None = None) -> PullPolicy:
    """The policy a container has: ``declared`` (its ``imagePullPolicy``) or the default for
    ``image``. ``ValueError`` for a policy Kubernetes does not know."""
    if declared:
        try:
            return PullPolicy(declared)
        except ValueError:
            allowed = ", ".join(p.value for p in PullPolicy)
            raise ValueError(f"imagePullPolicy {declared!r} is not one of {allowed}") from None
    ref = Reference.parse(image)
    if ref.tag == "latest" or (ref.tag is None and ref.digest is None):
        return PullPolicy.ALWAYS
    return PullPolicy.IF_NOT_PRESENT


def should_pull(policy: PullPolicy, present: bool, image: str) -> bool:
    """Whether to pull ``image`` now. ``Never`` with the image missing raises
    ``ImageNeverPullError``, which the pod reports as ``ErrImageNeverPull``."""
    if policy is PullPolicy.ALWAYS:
        return True
    if policy is PullPolicy.IF_NOT_PRESENT:
        return not present
    if not present:
        raise ImageNeverPullError(
            f"{image} is not on this node and its imagePullPolicy is Never: import it with"
            " `outpost image import` or change the policy"
        )
    return False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to keep trying a registry that does not answer: ``attempts`` tries per request,
    waiting up to ``initial_s`` doubling up to ``max_s`` in between (a random part of it: full
    jitter); ``timeout_s`` bounds each connect, read and write."""

    attempts: int = 5
    initial_s: float = 1.0
    max_s: float = 30.0
    timeout_s: float = 30.0

    @property
    def backoff(self) -> Backoff:
        # Each request is retried on its own: there is no connection to stay up, so no reset.
        return Backoff(self.initial_s, self.max_s)


DEFAULT_RETRY = RetryPolicy()
