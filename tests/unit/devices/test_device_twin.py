"""DeviceTwin in virtual time: collect and report cycles, deadbands, desired values, state and
backoff, without a device or a clock."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.backoff import Backoff
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.devices.twin import (
    OFFLINE,
    ONLINE,
    UNKNOWN,
    DeviceTwin,
    Read,
    Report,
    Write,
)
from edge.devices.values import decode_registers, encode_registers
from edge.wire.events import Op

WALL = 1_700_000_000.0


def prop(name: str = "t", type_: str = "FLOAT", **kw: Any) -> PropertyConfig:
    visitor = kw.pop("visitor", {"register": "HoldingRegister", "offset": 0, "dataType": "int16"})
    return PropertyConfig(name=name, type=type_, visitor=visitor, **kw)


def device(*props: PropertyConfig, name: str = "d1") -> DeviceConfig:
    return DeviceConfig("plant", name, f"uid-{name}", "modbus-rtu", {}, list(props or [prop()]))


@dataclass
class Sim:
    """A device behind a twin: ``values`` by property, ``fail`` maps a property (or "*") to the
    reason its requests fail with. Runs the twin's loop in virtual time."""

    twin: DeviceTwin
    values: dict[str, Any] = field(default_factory=dict)
    fail: dict[str, str] = field(default_factory=dict)
    request_s: float = 0.01
    timeout_s: float = 0.5
    now: float = 0.0
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    reports: list[tuple[float, Report]] = field(default_factory=list)
    transform: Callable[[str, Any], Any] = lambda name, value: value

    def step(self) -> None:
        action = self.twin.next_action(self.now)
        if action is not None:
            name = action.property.name
            reason = self.fail.get(name) or self.fail.get("*")
            kind = "write" if isinstance(action, Write) else "read"
            self.requests.append((self.now, kind, name))
            self.now += self.timeout_s if reason == "Timeout" else self.request_s
            if isinstance(action, Write):
                if reason:
                    self.twin.write_failed(name, reason, f"{reason} on {name}", self.now)
                else:
                    self.values[name] = self.transform(name, action.value)
                    self.twin.write_done(name, self.now)
            elif reason:
                self.twin.read_failed(name, reason, f"{reason} on {name}", self.now)
            else:
                self.twin.read_done(name, self.values[name], self.now, readback=action.readback)
        self.reports += [(self.now, r) for r in self.twin.take_reports(self.now)]
        if action is None:
            wake = self.twin.next_wakeup()
            assert wake > self.now  # reports were just taken: nothing is due
            self.now = wake

    def run_until(self, t: float) -> None:
        while self.now < t:
            self.step()

    def reads(self, name: str | None = None) -> list[float]:
        return [t for t, kind, n in self.requests if kind == "read" and name in (None, n)]

    def twins(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, r.body) for t, r in self.reports if r.op == Op.TWIN]

    def telemetry(self) -> list[dict[str, Any]]:
        return [r.body for _, r in self.reports if r.op == Op.TELEMETRY]


def sim(*props: PropertyConfig, **values: Any) -> Sim:
    twin = DeviceTwin(device(*props), 0.0, wall_offset=WALL)
    return Sim(twin, values={p.name: 0 for p in twin.config.properties} | values)


def reported(body: dict[str, Any], name: str = "t") -> str | None:
    for twin in body["twins"]:
        if twin["propertyName"] == name:
            return twin.get("reported", {}).get("value")
    raise KeyError(name)


def test_collect_cycles_keep_time_and_the_first_value_goes_up_at_once() -> None:
    s = sim(prop("t", collect_s=1.0), prop("h", collect_s=0.25), t=21.5, h=40.0)
    assert s.twin.state == UNKNOWN
    s.run_until(10.0)
    assert len(s.reads("t")) == 10
    assert all(abs(t - round(t)) <= 0.03 for t in s.reads("t"))
    assert len(s.reads("h")) == 40
    # No drift: every read of h is within a request of its slot.
    assert all(abs(t - round(t * 4) / 4) <= 0.021 for t in s.reads("h"))
    (t0, first), *_ = s.twins()
    assert t0 <= 0.03
    assert first["state"] == ONLINE
    assert first["uid"] == "uid-d1"
    assert first["lastOnlineTime"] == "2023-11-14T22:13:20Z"
    assert reported(first, "t") == "21.5"
    assert first["twins"][0]["reported"]["metadata"] == {
        "timestamp": str(math.floor((WALL + 0.01) * 1000)),
        "type": "float",
    }
    assert first["reasons"] == []


def test_deadband_gates_telemetry_and_the_twin_report_cycle() -> None:
    s = sim(prop("t", collect_s=1.0, report_s=5.0, deadband=0.5), t=20.0)
    s.run_until(2.5)
    assert [b["value"] for b in s.telemetry()] == [20.0]
    s.values["t"] = 20.4  # within the deadband: nothing
    s.run_until(7.5)
    assert [b["value"] for b in s.telemetry()] == [20.0]
    assert [reported(b) for _, b in s.twins()] == ["20"]
    s.values["t"] = 21.0  # beyond: one telemetry at once, the twin at its next report cycle
    s.run_until(8.5)
    assert [b["value"] for b in s.telemetry()] == [20.0, 21.0]
    assert s.telemetry()[-1] == {
        "uid": "uid-d1",
        "property": "t",
        "value": 21.0,
        "time": math.floor((WALL + 8.01) * 1000),
    }
    assert [reported(b) for _, b in s.twins()] == ["20"]
    s.run_until(10.5)
    times_values = [(round(t), reported(b)) for t, b in s.twins()]
    assert times_values == [(0, "20"), (10, "21")]
    # A slow drift past the deadband from the last *reported* value is reported.
    for step in range(1, 4):
        s.values["t"] = 21.0 + 0.3 * step
        s.run_until(10.5 + 5 * step)
    assert [reported(b) for _, b in s.twins()][1:] == ["21", "21.6"]  # 21.3 and 21.9 were not


def test_telemetry_and_twins_leave_out_local_properties() -> None:
    s = sim(prop("t"), prop("secret", report_to_cloud=False), t=1, secret=2)
    s.run_until(3)
    assert {b["property"] for b in s.telemetry()} == {"t"}
    assert [t["propertyName"] for t in s.twins()[-1][1]["twins"]] == ["t"]
    view = s.twin.view()
    assert [(p["name"], p["value"]) for p in view["properties"]] == [("t", "1"), ("secret", "2")]


def test_a_twin_refreshes_each_minute_while_online_and_on_demand() -> None:
    s = sim(prop("t", report_s=1.0), t=1)
    s.run_until(200)
    assert [round(t) for t, _ in s.twins()] == [0, 60, 120, 180]
    s.twin.report_again()
    s.step()
    assert round(s.twins()[-1][0]) == 200


def setpoint(**kw: Any) -> PropertyConfig:
    return prop(
        "sp",
        visitor={"register": "HoldingRegister", "offset": 1, "dataType": "int16", "scale": 0.5},
        minimum=5,
        maximum=30,
        **kw,
    )


def test_desired_value_is_written_read_back_and_observed() -> None:
    s = sim(setpoint(desired="21.5"), sp=20.0)
    s.run_until(0.5)
    assert s.requests[:2] == [(0.0, "write", "sp"), (0.01, "read", "sp")]
    assert s.values["sp"] == 21.5
    (entry,) = s.twins()[-1][1]["twins"]
    stamp = str(math.floor((WALL + 0.02) * 1000))
    assert entry == {
        "propertyName": "sp",
        "reported": {"value": "21.5", "metadata": {"timestamp": stamp, "type": "float"}},
        "observedDesired": {"value": "21.5", "metadata": {"timestamp": stamp, "type": "float"}},
    }
    s.run_until(10)
    assert [kind for _, kind, _ in s.requests].count("write") == 1  # written once
    # A new desired value: written again, observed again.
    s.twin.update_desired(device(setpoint(desired="22")), s.now)
    s.run_until(11)
    assert s.values["sp"] == 22
    assert s.twin.twin_body()["twins"][0]["observedDesired"]["value"] == "22"


def test_a_read_back_that_differs_is_retried_with_backoff() -> None:
    s = sim(setpoint(desired="21.5"), sp=20.0)
    s.transform = lambda name, value: 25.0  # the device clamps whatever is written
    s.run_until(20)
    writes = [t for t, kind, _ in s.requests if kind == "write"]
    assert len(writes) >= 4
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert gaps == sorted(gaps)  # backing off
    reasons = s.twin.reasons()
    assert reasons == [
        {"property": "sp", "reason": "ReadBackMismatch", "message": "wrote 21.5, read back 25"}
    ]
    assert "observedDesired" not in s.twin.twin_body()["twins"][0]
    s.transform = lambda name, value: value  # fixed: the next retry succeeds
    s.run_until(60)
    assert s.twin.reasons() == []
    assert s.twin.twin_body()["twins"][0]["observedDesired"]["value"] == "21.5"


def test_desired_values_that_must_not_be_written() -> None:
    readonly = prop("a", access_mode="ReadOnly", desired="1")
    input_register = prop("b", visitor={"register": "InputRegister", "offset": 0}, desired="1")
    wrong = setpoint(desired="warm")
    high = prop("c", maximum=10, desired="11", visitor={"register": "HoldingRegister", "offset": 3})
    s = sim(readonly, input_register, wrong, high, a=0, b=0, sp=0, c=0)
    s.run_until(5)
    assert all(kind == "read" for _, kind, _ in s.requests)
    assert [(r["property"], r["reason"]) for r in s.twin.reasons()] == [
        ("a", "ReadOnly"),
        ("b", "ReadOnly"),
        ("sp", "WrongType"),
        ("c", "OutOfRange"),
    ]
    assert s.twin.reasons()[3]["message"] == "desired 11 is above maximum 10"
    # A value set locally stays until the Device's own desired value changes.
    s.twin.set_desired("c", "9", s.now)
    s.twin.update_desired(device(readonly, input_register, setpoint(desired="22"), high), s.now)
    s.run_until(6)
    assert s.values["c"] == 9
    assert s.values["sp"] == 22
    # Clearing the desired value clears its reason.
    s.twin.update_desired(
        device(prop("a", access_mode="ReadOnly"), input_register, setpoint(desired="22"), high), 6
    )
    assert [r["property"] for r in s.twin.reasons()] == ["b"]


def test_a_silent_device_goes_offline_and_is_backed_off() -> None:
    s = sim(prop("a", collect_s=1.0), prop("b", collect_s=1.0), a=1, b=2)
    s.run_until(5)
    assert s.twin.state == ONLINE
    s.fail["*"] = "Timeout"
    s.run_until(5 + 600)
    failing = [t for t, _, _ in s.requests if t >= 5]
    # Without backoff: 2 requests a second. With it: 1 s, 2 s, 4 s ... capped at 30 s.
    assert len(failing) < 30
    gaps = [b - a for a, b in itertools.pairwise(failing)]
    assert max(gaps) <= 30.0 + 0.5 + 1e-6
    assert gaps[-1] > 29
    assert s.twin.state == OFFLINE
    offline = [b for _, b in s.twins() if b["state"] == OFFLINE]
    assert len(offline) == 1  # the change goes up once; nothing else changes while offline
    assert [(r["property"], r["reason"]) for r in offline[0]["reasons"]] == [("", "Timeout")]
    assert offline[0]["lastOnlineTime"]
    # It comes back: the next probe finds it, everything resumes at its cycle.
    del s.fail["*"]
    s.run_until(s.now + 31)
    assert s.twin.state == ONLINE
    assert s.twin.reasons() == []
    assert s.twins()[-1][1]["state"] == ONLINE
    back = [t for t in s.reads() if t > s.now - 5]
    assert len(back) >= 8


def test_unknown_until_the_first_answer_then_offline_after_n_failures() -> None:
    s = sim(prop("a"), a=1)
    s.fail["*"] = "Timeout"
    s.step()
    s.step()
    assert s.twin.state == UNKNOWN
    assert s.twins() == [] or s.twins()[-1][1]["state"] == UNKNOWN
    s.run_until(10)
    assert s.twin.state == OFFLINE
    assert s.twin.twin_body()["lastOnlineTime"] == ""
    assert s.twins()[-1][1]["state"] == OFFLINE


def test_an_illegal_address_backs_off_that_property_only() -> None:
    s = sim(prop("good", collect_s=1.0), prop("bad", collect_s=1.0), good=1, bad=2)
    s.fail["bad"] = "IllegalAddress"
    s.run_until(120)
    assert s.twin.state == ONLINE
    assert len(s.reads("good")) == 120
    assert len(s.reads("bad")) < 12
    assert s.twin.reasons() == [
        {"property": "bad", "reason": "IllegalAddress", "message": "IllegalAddress on bad"}
    ]
    assert s.twins()[-1][1]["reasons"] == s.twin.reasons()
    del s.fail["bad"]
    s.run_until(160)
    assert s.twin.reasons() == []


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [Backoff(0.5, 4.0).ceiling(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert Backoff(1.0, 30.0).ceiling(10_000) == 30.0


def test_a_driver_that_does_not_open_counts_as_a_device_failure() -> None:
    twin = DeviceTwin(device(prop("a")), 0.0)
    for i in range(3):
        twin.device_failed("Disconnected", "/dev/ttyUSB9: no such file", float(i * 100))
    assert twin.state == OFFLINE
    assert twin.next_action(200.0) is None
    assert twin.retry_at == 200.0 + 4.0
    assert isinstance(twin.next_action(204.0), Read)


# -- a shared bus: several twins, one line, one request at a time ----------------------------


def shared_bus(dead: set[int], n: int = 8, until: float = 300.0) -> dict[int, list[float]]:
    """Discrete-event simulation of ``n`` devices polled in turn over one bus: a request takes
    10 ms, a dead slave's 500 ms (its timeout). Returns each device's read times."""
    twins = {i: DeviceTwin(device(prop("t", collect_s=1.0), name=f"d{i}"), 0.0) for i in range(n)}
    reads: dict[int, list[float]] = {i: [] for i in range(n)}
    bus_free = 0.0
    queue = [(0.0, i) for i in range(n)]
    heapq.heapify(queue)
    while queue:
        at, i = heapq.heappop(queue)
        if at >= until:
            break
        twin = twins[i]
        now = max(at, bus_free)  # waits for its turn on the bus
        action = twin.next_action(now)
        if action is None:
            heapq.heappush(queue, (max(twin.next_wakeup(), now + 1e-3), i))
            continue
        if i in dead:
            bus_free = now + 0.5
            twin.read_failed("t", "Timeout", "no answer", bus_free)
        else:
            bus_free = now + 0.01
            reads[i].append(now)
            twin.read_done("t", 1, bus_free)
        twin.take_reports(bus_free)
        heapq.heappush(queue, (bus_free, i))
    return reads


def test_a_dead_slave_does_not_stall_the_live_ones() -> None:
    reads = shared_bus(dead={3})
    for i, times in reads.items():
        if i == 3:
            continue
        assert len(times) >= 295, (i, len(times))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Late by at most one dead timeout, now and then.
        assert max(gaps) <= 1.0 + 0.5 + 0.08, (i, max(gaps))
        assert sum(g > 1.1 for g in gaps) <= 15


# -- properties over random outcomes ---------------------------------------------------------

OUTCOMES = st.sampled_from(["ok", "ok", "ok", "Timeout", "CRCError", "IllegalAddress"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(OUTCOMES, st.floats(-50, 50), st.floats(0, 3)), min_size=1, max_size=80),
    st.sampled_from([0.0, 0.5, 2.0]),
)
def test_invariants_over_random_outcomes(
    steps: list[tuple[str, float, float]], deadband: float
) -> None:
    twin = DeviceTwin(
        device(prop("a", deadband=deadband, report_s=2.0), prop("b", collect_s=0.5)), 0.0
    )
    now = 0.0
    last_twin: dict[str, float] = {}
    consecutive = 0
    answered = False
    for outcome, value, pause in steps:
        now += pause
        action = twin.next_action(now)
        if now < twin.retry_at:
            assert action is None
        if action is None:
            twin.take_reports(now)
            assert twin.next_wakeup() > now  # nothing due: the caller may sleep
            continue
        name = action.property.name
        now += 0.01
        if outcome == "ok":
            value = round(value, 1)
            twin.read_done(name, value, now)
            consecutive, answered = 0, True
        else:
            twin.read_failed(name, outcome, outcome, now)
            if outcome == "IllegalAddress":
                consecutive, answered = 0, True
            else:
                consecutive += 1
                assert twin.retry_at - now <= twin.backoff_cap_s + 1e-9
        expected = OFFLINE if consecutive >= 3 else ONLINE if answered else UNKNOWN
        assert twin.state == expected
        for report in twin.take_reports(now):
            if report.op != Op.TWIN:
                continue
            for entry in report.body["twins"]:
                if entry["propertyName"] != "a" or "reported" not in entry:
                    continue
                new = float(entry["reported"]["value"])
                old = last_twin.get("a")
                # Reported values only ever move beyond the deadband.
                assert old is None or new == old or abs(new - old) > deadband
                last_twin["a"] = new


@given(st.integers(-(2**15), 2**15 - 1))
def test_desired_round_trip_through_a_register(raw: int) -> None:
    cfg = setpoint()
    value = decode_registers([raw & 0xFFFF], cfg)
    if not 5 <= value <= 30:
        return
    s = sim(setpoint(desired=str(value)), sp=0.0)
    s.transform = lambda name, v: decode_registers(encode_registers(v, cfg), cfg)
    s.run_until(1)
    assert s.twin.twin_body()["twins"][0]["observedDesired"]["value"] == str(value)
