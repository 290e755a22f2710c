"""The DeviceStatus rule without I/O: latest wins, one write per device per interval, never two
writes of one device at once, and what the edge sends shaped to the CRD."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.devices.status import PendingStatus, StatusCoalescer, TokenBucket, status_from_report


def item(name: str, value: int, ns: str = "ns") -> PendingStatus:
    return PendingStatus("gw", ns, name, f"uid-{name}", {"twins": [{"v": value}]})


def test_a_first_report_is_due_at_once_and_the_next_only_after_the_interval() -> None:
    core = StatusCoalescer(interval_s=2.0)
    core.offer(item("a", 1), now=10.0)
    assert core.take(10.0) == item("a", 1)
    core.done(("ns", "a"), 10.1)
    core.offer(item("a", 2), now=10.5)
    core.offer(item("a", 3), now=11.0)
    assert core.take(11.9) is None
    assert core.next_due() == 12.0
    assert core.take(12.0) == item("a", 3)  # the latest
    assert core.coalesced == 1
    assert core.offered == 3
    assert core.take(100.0) is None


def test_a_device_is_never_written_twice_at_once() -> None:
    core = StatusCoalescer(interval_s=1.0)
    core.offer(item("a", 1), now=0.0)
    assert core.take(0.0) is not None
    core.offer(item("a", 2), now=0.5)
    # The write is slow: the interval passes while it is in progress.
    assert core.take(5.0) is None
    core.done(("ns", "a"), 5.0)
    assert core.take(5.0) == item("a", 2)


def test_a_failed_write_is_retried_unless_a_newer_status_came() -> None:
    core = StatusCoalescer(interval_s=1.0)
    core.offer(item("a", 1), now=0.0)
    failed = core.take(0.0)
    assert failed is not None
    core.retry(failed, 0.1)
    core.done(("ns", "a"), 0.1)
    assert core.take(1.0) == item("a", 1)
    core.done(("ns", "a"), 1.0)
    core.offer(item("a", 2), now=1.5)
    core.retry(item("a", 1), 1.5)  # an older one failing late does not replace the newer
    assert core.take(2.0) == item("a", 2)


def test_a_forgotten_device_is_not_written() -> None:
    core = StatusCoalescer(interval_s=1.0)
    core.offer(item("a", 1), now=0.0)
    core.offer(item("b", 1), now=0.0)
    core.forget(("ns", "a"))
    assert core.take(0.0) == item("b", 1)
    assert core.take(0.0) is None
    assert core.next_due() is None


def test_devices_are_served_in_due_order() -> None:
    core = StatusCoalescer(interval_s=1.0)
    for n, name in enumerate("abc"):
        core.offer(item(name, 0), now=float(n))
        assert core.take(float(n)) is not None
        core.done(("ns", name), float(n))
    for name in "cba":
        core.offer(item(name, 1), now=10.0)
    # Each was written long enough ago: all due, served in the order they became due.
    assert [core.take(10.0).name for _ in range(3)] == ["c", "b", "a"]  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.floats(0, 0.5, allow_nan=False)),
        min_size=1,
        max_size=200,
    )
)
def test_writes_are_bounded_per_device_and_the_last_value_always_lands(
    reports: list[tuple[str, float]],
) -> None:
    """Reports at arbitrary times; the writer takes whatever is due every 0.1 s. Each device
    is written at most once per interval, and after the last report its latest value is
    written."""
    interval = 1.0
    core = StatusCoalescer(interval_s=interval)
    now = 0.0
    writes: dict[str, list[float]] = {}
    last_written: dict[str, int] = {}
    latest: dict[str, int] = {}
    for seq, (name, gap) in enumerate(reports):
        now += gap
        core.offer(item(name, seq), now)
        latest[name] = seq
        while (taken := core.take(now)) is not None:
            writes.setdefault(taken.name, []).append(now)
            last_written[taken.name] = taken.status["twins"][0]["v"]
            core.done(taken.id, now)
    for _ in range(int(interval / 0.1) + 2):
        now += 0.1
        while (taken := core.take(now)) is not None:
            writes.setdefault(taken.name, []).append(now)
            last_written[taken.name] = taken.status["twins"][0]["v"]
            core.done(taken.id, now)
    assert last_written == latest
    for times in writes.values():
        assert all(b - a >= interval - 1e-9 for a, b in itertools.pairwise(times))


def test_the_global_bucket_spaces_writes_after_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert abs(bucket.wait() - 0.1) < 1e-9
    assert bucket.take(0.1)


def test_a_report_is_shaped_to_the_crd() -> None:
    status = status_from_report(
        {
            "uid": "u",
            "state": "online",
            "lastOnlineTime": "2024-01-01T00:00:00Z",
            "twins": [
                {
                    "propertyName": "temperature",
                    "reported": {"value": 21.5, "metadata": {"timestamp": 1700, "type": "float"}},
                    "observedDesired": {"value": True},
                    "extra": "dropped",
                },
                {"reported": {"value": "no name"}},
                "garbage",
            ],
            "reasons": [{"property": "setpoint", "reason": "Timeout", "message": "x" * 2000}],
            "unknown": 1,
        }
    )
    assert status == {
        "state": "online",
        "lastOnlineTime": "2024-01-01T00:00:00Z",
        "twins": [
            {
                "propertyName": "temperature",
                "reported": {"value": "21.5", "metadata": {"timestamp": "1700", "type": "float"}},
                "observedDesired": {"value": "true"},
            }
        ],
        "reasons": [{"property": "setpoint", "reason": "Timeout", "message": "x" * 1024}],
    }
    assert status_from_report({"state": "exploded"})["state"] == "unknown"
