"""Who may take a node: the pure rules of ``cloud.hub.ownership``."""

from __future__ import annotations

from cloud.hub.ownership import (
    MAX_NAME,
    NODE_PREFIX,
    Elsewhere,
    ReplicaView,
    judge,
    lease_name,
    sanitize_id,
)

ME, MY_URL = "r1", "https://r1:8443"
OTHER_URL = "https://r2:8443"
NOW = 1_000_000.0


def alive(renewed_ago: float = 1.0, duration: float = 15.0) -> ReplicaView:
    return ReplicaView("r2", NOW - renewed_ago, duration)


def test_a_free_node_may_be_taken() -> None:
    assert judge(None, "", ME, MY_URL, None, NOW) is None
    assert judge("", "", ME, MY_URL, None, NOW) is None


def test_a_node_this_replica_holds_is_its_own() -> None:
    assert judge(ME, MY_URL, ME, MY_URL, alive(), NOW) is None


def test_a_node_held_by_a_live_replica_is_redirected_there_until_its_lease_would_run_out() -> None:
    verdict = judge("r2", OTHER_URL, ME, MY_URL, alive(renewed_ago=4.5), NOW)
    assert verdict == Elsewhere("r2", OTHER_URL, 11)


def test_the_wait_is_at_least_a_second() -> None:
    verdict = judge("r2", OTHER_URL, ME, MY_URL, alive(renewed_ago=14.99), NOW)
    assert isinstance(verdict, Elsewhere)
    assert verdict.retry_after_s == 1


def test_a_node_held_by_a_replica_whose_lease_ran_out_may_be_taken_over() -> None:
    assert judge("r2", OTHER_URL, ME, MY_URL, alive(renewed_ago=15.0), NOW) is None
    assert judge("r2", OTHER_URL, ME, MY_URL, ReplicaView("r2", None, 15), NOW) is None


def test_a_node_held_by_a_replica_without_a_lease_may_be_taken_over() -> None:
    # Its replica shut down cleanly (and deleted its lease), or was forgotten long ago.
    assert judge("r2", OTHER_URL, ME, MY_URL, None, NOW) is None


def test_a_holder_at_this_replicas_own_url_is_an_earlier_run_of_it() -> None:
    # Redirecting there would send the edge back here.
    assert judge("r1-old", MY_URL, ME, MY_URL, alive(), NOW) is None


def test_a_holder_with_no_url_cannot_be_redirected_to() -> None:
    assert judge("r2", "", ME, MY_URL, alive(), NOW) is None


def test_lease_names_are_valid_whatever_the_node_name() -> None:
    assert lease_name(NODE_PREFIX, "gw-1") == "outpost-node-gw-1"
    long = "a" * 253
    name = lease_name(NODE_PREFIX, long)
    assert len(name) == MAX_NAME
    assert name != lease_name(NODE_PREFIX, "a" * 252 + "b")


def test_replica_ids_are_made_valid_names() -> None:
    assert sanitize_id("Cloud_Host.example-1234") == "cloud-host.example-1234"
    assert sanitize_id("--") == "replica"
