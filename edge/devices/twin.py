"""One device's twin: what to ask the device next, and what to report, in virtual time.

Sans-IO. ``DeviceTwin`` does no I/O and reads no clock: the caller (``edge.devices.manager``)
passes ``now`` (trio's monotonic clock, in seconds) into every call, performs the actions the
twin asks for with a driver, feeds the outcomes back, and sends the reports it hands out. So
every rule below is tested without a device, a bus or real time.

The loop a caller runs::

    while True:
        action = twin.next_action(now)        # Write, Read or None
        ... perform it: twin.read_done / read_failed / write_done / write_failed
        for report in twin.take_reports(now): # TWIN and TELEMETRY
            ...
        sleep until twin.next_wakeup() (or until the configuration changes)

Rules, per property:

- **Collect cycle.** A property is read every ``collect_s``; a late read does not cause a burst
  of catch-up reads. Among due properties the most overdue goes first, so properties of one
  device share its turn fairly.
- **Telemetry.** Every reading of a property that reports to the cloud and moved more than
  ``deadband`` from the last telemetry sent becomes one ``TELEMETRY`` report (the bounded
  history; the store drops those first when short of space).
- **Report cycle.** Every ``report_s`` the twin's reported value takes the latest reading, if it
  moved more than ``deadband`` from the reported one. The first value is reported at once.
- **Desired values.** A desired value is written, then read back at once. A read-back that
  matches (within what the register can hold, see ``values.same_value``) becomes
  ``observedDesired``; a mismatch or a failed write is retried with backoff. A desired value
  that is not of the property's type, is outside its minimum/maximum, or is for a property that
  cannot be written is never written; the reason says why.

Per device:

- **State.** ``unknown`` until the first answer; ``online`` once the device answers (a reply
  saying a register does not exist is an answer); ``offline`` after ``offline_after``
  consecutive device-level failures (``Timeout``, ``CRCError``, ``Disconnected``).
- **Backoff.** After a device-level failure the device is left alone for a while: the backoff
  starts at the shortest collect cycle of the device and doubles with every further failure up
  to ``backoff_cap_s``. When it runs out a single request probes the device. So a dead slave
  costs its bus one timeout per backoff period, not one per property per cycle. A property
  that fails on its own (an illegal address) is backed off alone. The waits are the ceilings of
  ``edge.backoff``, without its jitter: jitter spreads many clients of one server, while a
  device has one client, and its bus's schedule stays predictable (and testable in virtual
  time). Any answer starts the count over.
- **TWIN reports** go out when something changed: at once for a change of state, a first value
  or a new observedDesired; otherwise (new reported values, reasons) at most once per shortest
  report cycle; and every ``refresh_s`` while online, so ``lastOnlineTime`` stays fresh.
  They are meant to be coalesced per device (latest wins).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edge.backoff import Backoff
from edge.devices.drivers.base import DEVICE_LEVEL_REASONS
from edge.devices.model import DeviceConfig, PropertyConfig
from edge.devices.values import from_text, same_value, to_text, within_deadband
from edge.wire.events import Op

UNKNOWN = "unknown"
ONLINE = "online"
OFFLINE = "offline"

DEFAULT_OFFLINE_AFTER = 3
DEFAULT_BACKOFF_CAP_S = 30.0
DEFAULT_REFRESH_S = 60.0
# Telemetry waiting for take_reports; beyond this the oldest go (the caller is far behind).
MAX_PENDING_TELEMETRY = 10_000


@dataclass(frozen=True, slots=True)
class Read:
    """Read ``property``; ``readback`` when it checks a write just made."""

    property: PropertyConfig
    readback: bool = False


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``value`` (of the property's model type) to ``property``."""

    property: PropertyConfig
    value: Any


@dataclass(frozen=True, slots=True)
class Report:
    """An upstream report: ``op`` is ``Op.TWIN`` (coalesce per device) or ``Op.TELEMETRY``
    (never coalesce)."""

    op: Op
    key: str
    body: dict[str, Any]


def rfc3339(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _ms(wall: float) -> int:
    return math.floor(wall * 1000)


@dataclass
class _Property:
    config: PropertyConfig
    next_collect: float
    next_report: float
    # The latest reading, and when it was read (wall clock).
    value: Any = None
    value_wall: float = 0.0
    # What the twin reports, and what telemetry last said.
    twin_value: Any = None
    twin_wall: float = 0.0
    telemetry_value: Any = None
    # Property-level failures (the device answered, this property failed).
    failures: int = 0
    retry_at: float = 0.0
    reason: tuple[str, str] | None = None
    # Desired value: its text, its typed value when it is to be written, and the write's state.
    desired: str | None = None
    desired_value: Any = None
    writing: str | None = None  # None, "write" or "readback"
    write_at: float = 0.0
    write_failures: int = 0
    write_reason: tuple[str, str] | None = None
    observed: str | None = None
    observed_wall: float = 0.0


@dataclass
class DeviceTwin:
    """The twin of one device; see the module's docstring for the rules.

    ``wall_offset`` turns ``now`` into wall-clock time for timestamps (``time.time() -
    trio.current_time()``).
    """

    config: DeviceConfig
    start: float
    wall_offset: float = 0.0
    offline_after: int = DEFAULT_OFFLINE_AFTER
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    refresh_s: float = DEFAULT_REFRESH_S
    state: str = UNKNOWN
    failures: int = 0
    retry_at: float = 0.0
    reason: tuple[str, str] | None = None
    last_online_wall: float | None = None
    props: dict[str, _Property] = field(default_factory=dict)
    _telemetry: deque[Report] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_TELEMETRY))
    _urgent: bool = False
    _dirty: bool = False
    _last_twin: float | None = None

    def __post_init__(self) -> None:
        for prop in self.config.properties:
            self.props[prop.name] = _Property(prop, next_collect=self.start, next_report=self.start)
        for prop in self.config.properties:
            self._set_desired(self.props[prop.name], prop.desired, self.start)

    # -- configuration -----------------------------------------------------------------------

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def backoff(self) -> Backoff:
        """The device's backoff: from its shortest collect cycle up to ``backoff_cap_s``."""
        cycles = [p.collect_s for p in self.config.properties]
        return Backoff(min(self.backoff_cap_s, min(cycles, default=1.0)), self.backoff_cap_s)

    @property
    def twin_interval_s(self) -> float:
        return min((p.report_s for p in self.config.properties), default=1.0)

    def update_desired(self, config: DeviceConfig, now: float) -> None:
        """Take the desired values of ``config``, the same device otherwise (see
        ``DeviceConfig.without_desired``); new ones are written soon."""
        if config.without_desired() != self.config.without_desired():
            raise ValueError("update_desired takes the same device with other desired values")
        old = {p.name: p.desired for p in self.config.properties}
        self.config = config
        for prop in config.properties:
            state = self.props[prop.name]
            state.config = prop
            # Only what the Device changed: a value an app set locally stays until then.
            if prop.desired != old[prop.name]:
                self._set_desired(state, prop.desired, now)

    def set_desired(self, name: str, text: str | None, now: float) -> None:
        """Set one property's desired value locally (an app on the eventbus did)."""
        self._set_desired(self.props[name], text, now)

    def _set_desired(self, p: _Property, text: str | None, now: float) -> None:
        if text == p.desired and (p.writing or p.observed == text or p.write_reason):
            return
        p.desired = text
        p.desired_value = None
        p.writing = None
        p.write_failures = 0
        old_reason, p.write_reason = p.write_reason, None
        if text is None:
            self._dirty |= old_reason is not None
            return
        value, refusal = _desired_value(p.config, text)
        if refusal is not None:
            p.write_reason = refusal
            self._dirty = True
            return
        p.desired_value = value
        p.writing = "write"
        p.write_at = now
        self._dirty |= old_reason is not None

    # -- what to do next ---------------------------------------------------------------------

    def next_action(self, now: float) -> Read | Write | None:
        """The request to make now, or None when nothing is due (see ``next_wakeup``).
        Writes and their read-backs go before collecting."""
        if now < self.retry_at:
            return None
        for p in self.props.values():
            if p.writing and _write_due(p) <= now:
                if p.writing == "readback":
                    return Read(p.config, readback=True)
                return Write(p.config, p.desired_value)
        due = [p for p in self.props.values() if p.next_collect <= now and p.retry_at <= now]
        if not due:
            return None
        p = min(due, key=lambda p: max(p.next_collect, p.retry_at))
        return Read(p.config)

    def next_wakeup(self) -> float:
        """When something next becomes due (an action or a report): a time at or before now
        means at once, ``math.inf`` never."""
        times = [max(p.next_collect, p.retry_at) for p in self.props.values()]
        times += [_write_due(p) for p in self.props.values() if p.writing]
        action = max(min(times, default=math.inf), self.retry_at)
        report = min((p.next_report for p in self.props.values()), default=math.inf)
        if self._telemetry or self._urgent:
            return -math.inf
        if self._dirty and self._last_twin is not None:
            report = min(report, self._last_twin + self.twin_interval_s)
        elif self._dirty:
            return -math.inf
        if self._last_twin is not None and self.state == ONLINE:
            report = min(report, self._last_twin + self.refresh_s)
        return min(action, report)

    # -- outcomes ----------------------------------------------------------------------------

    def read_done(self, name: str, value: Any, now: float, *, readback: bool = False) -> None:
        p = self.props[name]
        self._answered(now)
        wall = now + self.wall_offset
        p.failures = 0
        p.retry_at = 0.0
        if p.reason is not None:
            p.reason = None
            self._dirty = True
        self._collected(p, now)
        p.value, p.value_wall = value, wall
        cfg = p.config
        if cfg.report_to_cloud and not within_deadband(p.telemetry_value, value, cfg.deadband):
            p.telemetry_value = value
            self._telemetry.append(
                Report(
                    Op.TELEMETRY,
                    self.key,
                    {"uid": self.config.uid, "property": name, "value": value, "time": _ms(wall)},
                )
            )
        first = p.twin_value is None
        if readback and p.writing == "readback":
            if same_value(p.desired_value, value, cfg):
                p.writing = None
                p.write_failures = 0
                p.write_reason = None
                p.observed, p.observed_wall = p.desired, wall
                first = True  # show the new value along with observedDesired
            else:
                self._write_failed(
                    p,
                    "ReadBackMismatch",
                    f"wrote {p.desired}, read back {to_text(value, cfg.type)}",
                    now,
                )
        if first:
            p.twin_value, p.twin_wall = value, wall
            if cfg.report_to_cloud:
                self._urgent = True

    def read_failed(self, name: str, reason: str, message: str, now: float) -> None:
        p = self.props[name]
        self._collected(p, now)
        if reason in DEVICE_LEVEL_REASONS:
            self._device_failed(reason, message, now)
            return
        self._answered(now)
        p.failures += 1
        p.retry_at = now + Backoff(p.config.collect_s, self.backoff_cap_s).ceiling(p.failures)
        self._dirty |= _changed(p.reason, reason)
        p.reason = (reason, message)

    def write_done(self, name: str, now: float) -> None:
        p = self.props[name]
        self._answered(now)
        if p.writing == "write":
            p.writing = "readback"
            p.write_at = now

    def write_failed(self, name: str, reason: str, message: str, now: float) -> None:
        p = self.props[name]
        if reason in DEVICE_LEVEL_REASONS:
            self._device_failed(reason, message, now)
            return  # the write stays due; the device's backoff holds it
        self._answered(now)
        self._write_failed(p, reason, message, now)

    def _write_failed(self, p: _Property, reason: str, message: str, now: float) -> None:
        p.write_failures += 1
        p.writing = "write"
        p.write_at = now + self.backoff.ceiling(p.write_failures)
        self._dirty |= _changed(p.write_reason, reason)
        p.write_reason = (reason, message)

    def _collected(self, p: _Property, now: float) -> None:
        """A read of ``p`` was made: its next one is a cycle after the last was due, or, when
        that has passed already, now (late, but no burst)."""
        due = p.next_collect + p.config.collect_s
        p.next_collect = due if due > now else now

    def _answered(self, now: float) -> None:
        self.failures = 0
        self.retry_at = 0.0
        self.last_online_wall = now + self.wall_offset
        if self.reason is not None:
            self.reason = None
            self._dirty = True
        if self.state != ONLINE:
            self.state = ONLINE
            self._urgent = True

    def _device_failed(self, reason: str, message: str, now: float) -> None:
        self.failures += 1
        self.retry_at = now + self.backoff.ceiling(self.failures)
        self._dirty |= _changed(self.reason, reason)
        self.reason = (reason, message)
        if self.failures >= self.offline_after and self.state != OFFLINE:
            self.state = OFFLINE
            self._urgent = True

    def device_failed(self, reason: str, message: str, now: float) -> None:
        """The device could not be reached at all (its driver did not open): counts as a
        device-level failure, with the same backoff."""
        self._device_failed(reason, message, now)

    # -- reports -----------------------------------------------------------------------------

    def take_reports(self, now: float) -> list[Report]:
        """Reports due now: every pending TELEMETRY, then a TWIN when one is due."""
        reports = list(self._telemetry)
        self._telemetry.clear()
        for p in self.props.values():
            if p.next_report > now:
                continue
            due = p.next_report + p.config.report_s
            p.next_report = due if due > now else now + p.config.report_s
            if p.value is None or within_deadband(p.twin_value, p.value, p.config.deadband):
                continue
            p.twin_value, p.twin_wall = p.value, p.value_wall
            if p.config.report_to_cloud:
                self._dirty = True
        if self._twin_due(now):
            reports.append(Report(Op.TWIN, self.key, self.twin_body()))
            self._last_twin = now
            self._urgent = self._dirty = False
        return reports

    def _twin_due(self, now: float) -> bool:
        if self._urgent or (self._dirty and self._last_twin is None):
            return True
        if self._last_twin is None:
            return False
        if self._dirty and now >= self._last_twin + self.twin_interval_s:
            return True
        return self.state == ONLINE and now >= self._last_twin + self.refresh_s

    def report_again(self) -> None:
        """Send the TWIN again at the next ``take_reports`` (the cloud may have lost it)."""
        self._urgent = True

    def twin_body(self) -> dict[str, Any]:
        """The TWIN report's body, shaped like DeviceStatus ``status`` (plus ``uid``)."""
        twins = []
        for p in self.props.values():
            cfg = p.config
            if not cfg.report_to_cloud:
                continue
            entry: dict[str, Any] = {"propertyName": cfg.name}
            if p.twin_value is not None:
                entry["reported"] = {
                    "value": to_text(p.twin_value, cfg.type),
                    "metadata": {"timestamp": str(_ms(p.twin_wall)), "type": cfg.type.lower()},
                }
            if p.observed is not None:
                entry["observedDesired"] = {
                    "value": p.observed,
                    "metadata": {"timestamp": str(_ms(p.observed_wall)), "type": cfg.type.lower()},
                }
            twins.append(entry)
        return {
            "uid": self.config.uid,
            "state": self.state,
            "lastOnlineTime": rfc3339(self.last_online_wall) if self.last_online_wall else "",
            "twins": twins,
            "reasons": self.reasons(),
        }

    def reasons(self) -> list[dict[str, str]]:
        """What is wrong now: the device's problem first, then each property's."""
        reasons = []
        if self.reason is not None:
            reasons.append({"property": "", "reason": self.reason[0], "message": self.reason[1]})
        for p in self.props.values():
            for problem in (p.reason, p.write_reason):
                if problem is not None:
                    reasons.append(
                        {"property": p.config.name, "reason": problem[0], "message": problem[1]}
                    )
        return reasons

    def view(self) -> dict[str, Any]:
        """Everything ``outpost device get`` and the eventbus show: all properties (also those
        not reported to the cloud), their latest readings, desired and observed values."""
        config = self.config
        properties = []
        for p in self.props.values():
            cfg = p.config
            properties.append(
                {
                    "name": cfg.name,
                    "type": cfg.type.lower(),
                    "accessMode": cfg.access_mode,
                    "unit": cfg.unit,
                    "value": None if p.value is None else to_text(p.value, cfg.type),
                    "timestamp": _ms(p.value_wall) if p.value is not None else None,
                    "reported": None if p.twin_value is None else to_text(p.twin_value, cfg.type),
                    "desired": p.desired,
                    "observedDesired": p.observed,
                    "reportToCloud": cfg.report_to_cloud,
                }
            )
        return {
            "namespace": config.namespace,
            "name": config.name,
            "uid": config.uid,
            "model": config.model,
            "protocol": config.protocol,
            "state": self.state,
            "lastOnlineTime": rfc3339(self.last_online_wall) if self.last_online_wall else "",
            "failures": self.failures,
            "reasons": self.reasons(),
            "properties": properties,
        }


def _changed(old: tuple[str, str] | None, reason: str) -> bool:
    # Only a new reason is news: a message that differs in detail (which property timed out,
    # after how long) is updated in place and goes up with the next report.
    return old is None or old[0] != reason


def _write_due(p: _Property) -> float:
    # A read-back that failed on its own waits out the property's backoff like any read.
    return max(p.write_at, p.retry_at) if p.writing == "readback" else p.write_at


def _desired_value(cfg: PropertyConfig, text: str) -> tuple[Any, tuple[str, str] | None]:
    """The typed value to write for desired ``text``, or why it must not be written."""
    if not cfg.writable:
        what = cfg.visitor.get("register") or "ReadOnly"
        return None, ("ReadOnly", f"desired {text!r} not written: {cfg.name} is {what}")
    try:
        value = from_text(text, cfg.type)
    except ValueError as exc:
        return None, ("WrongType", f"desired value of {cfg.name}: {exc}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if cfg.minimum is not None and value < cfg.minimum:
            return None, ("OutOfRange", f"desired {text} is below minimum {cfg.minimum:g}")
        if cfg.maximum is not None and value > cfg.maximum:
            return None, ("OutOfRange", f"desired {text} is above maximum {cfg.maximum:g}")
    return value, None
