"""The Node conditions written from an edge's node report."""

from __future__ import annotations

from typing import Any

from cloud.mirror.node_keeper import node_conditions

EARLIER = "2024-05-01T09:00:00Z"
NOW = "2024-05-01T10:00:00Z"


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def report(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"conditions": list(conditions)}


def test_without_a_ready_condition_in_the_report_the_node_is_ready() -> None:
    for body in (None, {}, report({"type": "DiskPressure", "status": "False"})):
        ready = by_type(node_conditions(body, {}, True, NOW))["Ready"]
        assert ready["status"] == "True"
        assert ready["reason"]


def test_reported_conditions_are_written_with_a_heartbeat() -> None:
    body = report(
        {"type": "MemoryPressure", "status": "False", "reason": "Enough", "message": "fine"},
        {"type": "DiskPressure", "status": "True", "reason": "Full", "message": "95%"},
        {"type": "PIDPressure", "status": "False"},
        {"type": "Ready", "status": "True", "reason": "Up", "message": ""},
    )
    conditions = by_type(node_conditions(body, {}, True, NOW))
    assert conditions.keys() == {"MemoryPressure", "DiskPressure", "PIDPressure", "Ready"}
    assert conditions["DiskPressure"]["status"] == "True"
    assert conditions["DiskPressure"]["reason"] == "Full"
    assert conditions["DiskPressure"]["message"] == "95%"
    assert conditions["Ready"]["reason"] == "Up"
    assert all(c["lastHeartbeatTime"] == NOW for c in conditions.values())


def test_conditions_kubernetes_does_not_know_for_nodes_are_not_written() -> None:
    body = report({"type": "GatewayHappy", "status": "True"}, {"status": "True"})
    assert set(by_type(node_conditions(body, {}, True, NOW))) == {"Ready"}


def test_the_transition_time_stays_while_the_status_does() -> None:
    body = report(
        {"type": "Ready", "status": "True"},
        {"type": "DiskPressure", "status": "False"},
    )
    previous = {"Ready": ("True", EARLIER), "DiskPressure": ("False", EARLIER)}
    conditions = by_type(node_conditions(body, previous, True, NOW))
    assert conditions["Ready"]["lastTransitionTime"] == EARLIER
    assert conditions["DiskPressure"]["lastTransitionTime"] == EARLIER


def test_the_transition_time_moves_when_the_status_changes() -> None:
    body = report(
        {"type": "Ready", "status": "False", "reason": "RuntimeDown"},
        {"type": "DiskPressure", "status": "True"},
    )
    previous = {"Ready": ("True", EARLIER), "DiskPressure": ("False", EARLIER)}
    conditions = by_type(node_conditions(body, previous, True, NOW))
    assert (conditions["Ready"]["status"], conditions["Ready"]["lastTransitionTime"]) == (
        "False",
        NOW,
    )
    assert conditions["Ready"]["reason"] == "RuntimeDown"
    assert conditions["DiskPressure"]["lastTransitionTime"] == NOW


def test_a_node_coming_back_from_not_ready_transitions_to_ready_now() -> None:
    # The node lifecycle controller set Ready Unknown while the edge was away.
    conditions = by_type(node_conditions(None, {"Ready": ("Unknown", EARLIER)}, True, NOW))
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Ready"]["lastTransitionTime"] == NOW


def test_a_condition_seen_for_the_first_time_transitions_now() -> None:
    body = report({"type": "PIDPressure", "status": "False"})
    conditions = by_type(node_conditions(body, {"Ready": ("True", EARLIER)}, True, NOW))
    assert conditions["PIDPressure"]["lastTransitionTime"] == NOW
    assert conditions["Ready"]["lastTransitionTime"] == EARLIER
