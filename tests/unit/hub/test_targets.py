"""Which cloud replica the edge dials next: rotation on failure, redirects, and the wait after
a redirect whose target is gone."""

from __future__ import annotations

import ssl

import pytest
import tenacity

from edge.hub.client import EdgeHub, HubConfig, LinkDown
from edge.hub.targets import Targets, cloud_url_of
from edge.store.aio import AsyncStore

A, B, C = "https://a:8443", "https://b:8443", "https://c:8443"


def test_one_url_is_always_the_one() -> None:
    targets = Targets([A])
    targets.failed(A, answered=False)
    assert targets.first() == A


def test_a_failed_url_moves_on_to_the_next_round_robin() -> None:
    targets = Targets([A, B, C])
    seen = []
    for _ in range(4):
        seen.append(targets.first())
        targets.failed(targets.first(), answered=False)
    assert seen == [A, B, C, A]


def test_the_url_that_last_served_is_dialled_first() -> None:
    targets = Targets([A, B])
    targets.failed(A, answered=False)
    targets.succeeded(B)
    assert targets.first() == B
    targets.failed(B, answered=False)
    assert targets.first() == A


def test_a_redirect_target_that_served_is_dialled_first_and_forgotten_once_it_fails() -> None:
    targets = Targets([A, B])
    targets.succeeded("https://owner:9000")
    assert targets.first() == "https://owner:9000"
    targets.failed("https://owner:9000", answered=False)
    assert targets.first() == A


def test_after_a_failed_redirect_the_replica_that_redirected_is_dialled_again() -> None:
    # B answered (it redirected to the owner, which is gone): B takes the node over once the
    # owner's lease runs out, so coming back to A, which is down, would only cost time.
    targets = Targets([A, B])
    targets.failed(A, answered=False)
    assert targets.first() == B
    targets.failed(B, answered=True)
    assert targets.first() == B


def test_duplicate_urls_count_once() -> None:
    targets = Targets([A, A, B])
    assert targets.urls == [A, B]


def test_no_urls_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Targets([])


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("wss://owner:9443/v1/connect", "https://owner:9443"),
        ("https://owner:9443/v1/connect", "https://owner:9443"),
        ("ws://owner:80/v1/connect", "http://owner:80"),
        ("/v1/connect", "https://a:8443"),
        ("//other:1/v1/connect", "https://other:1"),
    ],
)
def test_a_location_names_a_cloud_url(location: str, expected: str) -> None:
    assert cloud_url_of(location, "wss://a:8443/v1/connect") == expected


def _edge() -> EdgeHub:
    config = HubConfig(
        cloud_url=A, fallback_urls=(B,), node="gw", ssl_context=ssl.create_default_context()
    )
    return EdgeHub(AsyncStore(None), config)  # type: ignore[arg-type]


def _failed(exc: BaseException, attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_after_a_failed_redirect_the_edge_waits_for_the_owners_lease_not_its_backoff() -> None:
    edge = _edge()
    exc = LinkDown("owner gone", retry_after_s=9)
    exc.redirected = True
    # However many attempts failed before, the wait is the lease's remainder plus a spread.
    waits = [edge._wait(_failed(exc, attempt=12)) for _ in range(200)]
    assert all(9 <= wait <= 11 for wait in waits)


def test_the_edge_knows_every_configured_url() -> None:
    assert _edge().targets.urls == [A, B]
