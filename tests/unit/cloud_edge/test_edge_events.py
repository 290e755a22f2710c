"""Events from edge reports: the per-node rate limit and what a reported event becomes."""

from __future__ import annotations

import re

import pytest

from cloud.mirror.kube_events import TokenBucket, event_from_report


def takes(bucket: TokenBucket, now: float, times: int) -> list[bool]:
    return [bucket.take(now) for _ in range(times)]


def test_a_burst_is_let_through_then_nothing_more_at_that_moment() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert takes(bucket, 100.0, 4) == [True, True, True, False]


def test_after_a_burst_events_pass_at_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    takes(bucket, 0.0, 3)
    assert takes(bucket, 0.25, 1) == [False]  # half a token
    assert takes(bucket, 0.5, 2) == [True, False]
    assert takes(bucket, 1.5, 3) == [True, True, False]


def test_a_quiet_spell_saves_up_no_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=5.0, burst=3)
    takes(bucket, 0.0, 3)
    assert takes(bucket, 3600.0, 4) == [True, True, True, False]


def test_a_steady_stream_at_the_rate_is_never_dropped() -> None:
    # (A burst of 2 leaves room for float rounding of the clock.)
    bucket = TokenBucket(rate=5.0, burst=2)
    assert all(bucket.take(i * 0.2) for i in range(100))


def test_over_a_long_time_no_more_than_rate_times_time_plus_burst_pass() -> None:
    bucket = TokenBucket(rate=5.0, burst=25)
    passed = sum(bucket.take(i * 0.01) for i in range(1000))  # 100 a second for 10 s
    assert passed == pytest.approx(25 + 5 * 10, abs=1)


REPORT = {
    "uid": "pod-uid",
    "reason": "BackOff",
    "message": "Back-off restarting failed container",
    "type": "Warning",
    "fieldPath": "spec.containers{app}",
    "time": "2024-05-01T10:00:00Z",
}


def test_a_reported_event_keeps_what_the_edge_said() -> None:
    event = event_from_report("gw", "shop", "web", REPORT)
    assert (event.node, event.namespace, event.pod, event.uid) == ("gw", "shop", "web", "pod-uid")
    assert (event.reason, event.message, event.type) == (
        "BackOff",
        "Back-off restarting failed container",
        "Warning",
    )
    assert event.field_path == "spec.containers{app}"
    assert event.time == "2024-05-01T10:00:00Z"


def test_long_reasons_and_messages_are_cut_to_what_the_api_takes() -> None:
    event = event_from_report(
        "gw", "ns", "p", {**REPORT, "reason": "R" * 500, "message": "m" * 5000}
    )
    assert event.reason == "R" * 128
    assert event.message == "m" * 1024


@pytest.mark.parametrize("kind", [None, "", "Error", "Critical", 3])
def test_a_type_kubernetes_does_not_know_becomes_normal(kind: object) -> None:
    body = {**REPORT, "type": kind}
    assert event_from_report("gw", "ns", "p", body).type == "Normal"


def test_a_report_missing_fields_still_makes_an_event_stamped_now() -> None:
    event = event_from_report("gw", "ns", "p", {})
    assert (event.uid, event.reason, event.message, event.field_path) == ("", "", "", "")
    assert event.type == "Normal"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", event.time)


def test_events_differing_only_in_time_are_similar() -> None:
    first = event_from_report("gw", "ns", "p", REPORT)
    later = event_from_report("gw", "ns", "p", {**REPORT, "time": "2024-05-01T10:05:00Z"})
    other = event_from_report("gw", "ns", "p", {**REPORT, "fieldPath": "spec.containers{b}"})
    assert first.similar == later.similar
    assert first.similar != other.similar
