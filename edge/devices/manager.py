"""Runs the node's devices: one task per Device, driven by its ``DeviceTwin``.

The Devices (and the DeviceModels they name) come from a ``DeviceSource``: the store, where the
hub (joined) or the manifest folder (standalone) wrote the ``ns/Device/name`` and
``ns/DeviceModel/name`` objects (``store_devices``). The manager follows the store's change feed:
a changed Device or DeviceModel makes it read them again at once, and the link coming back
online makes every device report its twin again. It also reads them every ``resync_s``, a safety
net for what the feed cannot see (a store changed by another process).

What callers may rely on:

- Each device task opens its driver (``drivers.open_driver``), asks its twin what to do, does
  it, and hands the twin's reports to ``report(op, key, body, coalesce_key)``: ``TWIN`` with
  ``coalesce_key`` None (the store's default, per device: latest wins) and ``TELEMETRY`` with a
  unique one (never merged). A driver that cannot be opened is retried with the twin's backoff.
- A Device that cannot be run (no model, a bad address, a wrong type, an unknown protocol)
  reports a TWIN with state ``unknown`` and the reason in ``reasons``, and runs nothing; the
  others are unaffected. It starts as soon as what was wrong is fixed (its model arrives, say).
- A device whose desired values changed keeps its task and driver; any other change restarts
  its task; a removed device's task stops and closes its driver.
- Each device's last view (``DeviceTwin.view``) is kept in store state ``device/<ns>/<name>``,
  and the list of those keys in ``devices``: ``outpost device ls|get`` reads them, whether or
  not the agent runs. Views are saved when the twin reports, and otherwise at most every
  ``VIEW_SAVE_S`` (each save is a flash write).
- Each view is saved whenever the device's twin reports: the eventbus follows those saves on
  the feed. ``set_desired`` sets a desired value locally.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from edge.devices import values
from edge.devices.drivers import Buses, Driver, DriverError, open_driver
from edge.devices.model import DeviceConfig, DeviceConfigError, device_model_name, parse_device
from edge.devices.twin import UNKNOWN, DeviceTwin, Read, Report, Write
from edge.hub.link import LINK_STATE_KEY, LinkWatch
from edge.store.aio import AsyncStore
from edge.store.store import StoreError
from edge.wire.events import Op
from edge.wire.keys import DEVICE_KIND, DEVICE_MODEL_KIND

log = logging.getLogger("edge.devices")

DEVICE_KINDS = (DEVICE_KIND, DEVICE_MODEL_KIND)
INDEX_KEY = "devices"
VIEW_STATE_PREFIX = "device/"
VIEW_SAVE_S = 10.0
DEFAULT_RESYNC_S = 300.0

ReportFn = Callable[[Op, str, dict[str, Any], str | None], Awaitable[None]]
# (devices by key "ns/Device/name", models by key "ns/DeviceModel/name")
DeviceSource = Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any]]]]
OpenDriver = Callable[[DeviceConfig, Buses], Awaitable[Driver]]


def state_key(key: str) -> str:
    """The store state key of a device's view: ``device/<ns>/<name>`` for ``ns/Device/name``."""
    namespace, _, name = key.partition("/Device/")
    return f"{VIEW_STATE_PREFIX}{namespace}/{name}"


def model_key(device_key: str, body: dict[str, Any]) -> str:
    namespace = device_key.partition("/")[0]
    return f"{namespace}/DeviceModel/{device_model_name(body)}"


def store_devices(aio: AsyncStore, node: str) -> DeviceSource:
    """Devices in the store bound to ``node`` (or to no node), and every DeviceModel there."""

    def read() -> tuple[dict[str, Any], dict[str, Any]]:
        devices = {
            key: body
            for key, _, body in aio.store.list("Device")
            if (body.get("spec") or {}).get("nodeName") in (None, "", node)
        }
        models = {key: body for key, _, body in aio.store.list("DeviceModel")}
        return devices, models

    async def source() -> tuple[dict[str, Any], dict[str, Any]]:
        return await aio.run(read)

    return source


@dataclass
class _Failed:
    """A Device that cannot run, and why."""

    key: str
    uid: str
    error: DeviceConfigError
    reported: bool = False

    def body(self) -> dict[str, Any]:
        error = self.error
        return {
            "uid": self.uid,
            "state": UNKNOWN,
            "lastOnlineTime": "",
            "twins": [],
            "reasons": [
                {"property": error.property, "reason": error.reason, "message": error.message}
            ],
        }

    def view(self) -> dict[str, Any]:
        namespace, _, name = self.key.partition("/Device/")
        return {
            "namespace": namespace,
            "name": name,
            "uid": self.uid,
            "model": "",
            "protocol": "",
            "state": UNKNOWN,
            "lastOnlineTime": "",
            "failures": 0,
            "reasons": self.body()["reasons"],
            "properties": [],
        }


class _Runner:
    """One device's task: its driver, its twin, its loop."""

    def __init__(self, manager: DeviceManager, config: DeviceConfig, after: trio.Event) -> None:
        now = trio.current_time()
        self.m = manager
        self.config = config
        self.twin = DeviceTwin(config, now, wall_offset=time.time() - now)
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.after = after  # the task this one replaces has let go of the bus
        self._wake = trio.Event()
        self._saved_at = -float("inf")
        self._saved: dict[str, Any] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        driver: Driver | None = None
        try:
            with self.scope:
                await self.after.wait()
                await self.m._save_view(self.config.key, self.twin.view())
                while True:
                    now = trio.current_time()
                    action = self.twin.next_action(now)
                    if action is not None and driver is None:
                        driver = await self._open()
                        action = None  # the clock moved; ask again
                    elif action is not None:
                        await self._perform(driver, action)
                        await trio.lowlevel.checkpoint()  # a driver that never waits
                    await self._flush()
                    if action is None:
                        self._wake = trio.Event()
                        wakeup = self.twin.next_wakeup()
                        if wakeup > trio.current_time():
                            with trio.move_on_at(wakeup):
                                await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True):
                if driver is not None:
                    try:
                        await driver.aclose()
                    except Exception:
                        log.exception("closing a driver failed", extra={"device": self.config.key})
            self.done.set()

    async def _open(self) -> Driver | None:
        try:
            driver = await self.m.open_driver(self.config, self.m.buses)
        except DriverError as exc:
            self.twin.device_failed(exc.reason, exc.message, trio.current_time())
            log.warning(
                "cannot open device",
                extra={"device": self.config.key, "reason": exc.reason, "error": exc.message},
            )
            return None
        log.info("device opened", extra={"device": self.config.key})
        return driver

    async def _perform(self, driver: Driver, action: Read | Write) -> None:
        prop = action.property
        try:
            if isinstance(action, Write):
                await driver.write(prop, action.value)
            else:
                value = values.coerce(await driver.read(prop), prop.type)
        except DriverError as exc:
            reason, message = exc.reason, exc.message
        except ValueError as exc:  # a value the property's type cannot hold
            reason, message = "WrongType", str(exc)
        except Exception as exc:
            # A bug in a driver: back the device off rather than spin on it.
            log.exception("driver failed", extra={"device": self.config.key, "property": prop.name})
            reason, message = "DeviceError", f"{type(exc).__name__}: {exc}"
        else:
            now = trio.current_time()
            if isinstance(action, Write):
                self.twin.write_done(prop.name, now)
            else:
                self.twin.read_done(prop.name, value, now, readback=action.readback)
            return
        now = trio.current_time()
        if isinstance(action, Write):
            self.twin.write_failed(prop.name, reason, message, now)
        else:
            self.twin.read_failed(prop.name, reason, message, now)

    async def _flush(self) -> None:
        now = trio.current_time()
        reports = self.twin.take_reports(now)
        twin_reported = False
        for report in reports:
            twin_reported |= report.op == Op.TWIN
            await self.m._report(report)
        if twin_reported or now >= self._saved_at + VIEW_SAVE_S:
            view = self.twin.view()
            if twin_reported or view != self._saved:
                self._saved, self._saved_at = view, now
                await self.m._save_view(self.config.key, view)


class DeviceManager:
    """The node's devices; see the module's docstring."""

    def __init__(
        self,
        store: AsyncStore,
        node: str,
        report: ReportFn,
        buses: Buses | None = None,
        *,
        source: DeviceSource | None = None,
        open_driver: OpenDriver = open_driver,
        resync_s: float = DEFAULT_RESYNC_S,
    ) -> None:
        self.store = store
        self.node = node
        self.report = report
        self.buses = buses if buses is not None else Buses()
        self.source = source if source is not None else store_devices(store, node)
        self.open_driver = open_driver
        self.resync_s = resync_s
        self.runners: dict[str, _Runner] = {}
        self.failed: dict[str, _Failed] = {}
        self.ready = trio.Event()  # set after the first reconcile
        self._wake = trio.Event()
        self._index: list[str] | None = None
        self._nursery: trio.Nursery | None = None

    # -- what others call --------------------------------------------------------------------

    def report_again(self) -> None:
        """Every device reports its twin again (the link is back; the cloud may have lost it)."""
        for runner in self.runners.values():
            runner.twin.report_again()
            runner.wake()
        for failed in self.failed.values():
            failed.reported = False
        self._wake.set()

    def set_desired(self, key: str, prop: str, text: str | None) -> None:
        """Set a desired value locally (until the Device's own desired value changes)."""
        runner = self.runners[key]
        runner.twin.set_desired(prop, text, trio.current_time())
        runner.wake()

    def views(self) -> dict[str, dict[str, Any]]:
        """Every device's current view, by key."""
        views = {key: runner.twin.view() for key, runner in self.runners.items()}
        views.update({key: failed.view() for key, failed in self.failed.items()})
        return dict(sorted(views.items()))

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._follow)
            try:
                while True:
                    self._wake = trio.Event()
                    await self.reconcile()
                    self.ready.set()
                    with trio.move_on_after(self.resync_s):
                        await self._wake.wait()
            finally:
                nursery.cancel_scope.cancel()

    async def _follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        link = LinkWatch()
        with self.store.feed.subscribe() as feed:
            task_status.started()
            async for changes in feed:
                if changes.touches(*DEVICE_KINDS):
                    self._wake.set()
                if changes.state_changed(LINK_STATE_KEY) and link.update(
                    await self.store.get_state(LINK_STATE_KEY)
                ):
                    # The outbox kept the latest twin of each while the link was down; this is
                    # a cheap guard against a cloud that lost them.
                    self.report_again()

    async def reconcile(self) -> None:
        assert self._nursery is not None, "reconcile runs inside run()"
        try:
            devices, models = await self.source()
        except (StoreError, OSError) as exc:
            log.warning("cannot read devices", extra={"error": str(exc)})
            return
        configs: dict[str, DeviceConfig | _Failed] = {}
        for key, body in devices.items():
            try:
                configs[key] = parse_device(body, models.get(model_key(key, body)))
            except DeviceConfigError as exc:
                uid = str((body.get("metadata") or {}).get("uid") or "")
                configs[key] = _Failed(key, uid, exc)
        for key in [k for k in (*self.runners, *self.failed) if k not in configs]:
            log.info("device removed", extra={"device": key})
            self._stop(key)
            self.failed.pop(key, None)
            await self._save_view(key, None)
        for key, config in configs.items():
            if isinstance(config, _Failed):
                await self._failed(key, config)
            else:
                self._run(key, config)
        await self._save_index(sorted(configs))

    def _stop(self, key: str) -> trio.Event:
        runner = self.runners.pop(key, None)
        if runner is None:
            done = trio.Event()
            done.set()
            return done
        runner.scope.cancel()
        return runner.done

    def _run(self, key: str, config: DeviceConfig) -> None:
        runner = self.runners.get(key)
        if runner is not None:
            if runner.config == config:
                return
            if runner.config.without_desired() == config.without_desired():
                runner.config = config
                runner.twin.update_desired(config, trio.current_time())
                runner.wake()
                return
            log.info("device changed: restarting it", extra={"device": key})
        elif key in self.failed:
            log.info("device fixed", extra={"device": key})
        else:
            log.info(
                "device admitted",
                extra={"device": key, "protocol": config.protocol, "uid": config.uid},
            )
        self.failed.pop(key, None)
        after = self._stop(key)
        runner = _Runner(self, config, after)
        self.runners[key] = runner
        assert self._nursery is not None
        self._nursery.start_soon(runner.run)

    async def _failed(self, key: str, failed: _Failed) -> None:
        old = self.failed.get(key)
        if (
            old is not None
            and (old.error.reason, old.error.message, old.uid)
            == (failed.error.reason, failed.error.message, failed.uid)
            and old.reported
        ):
            return
        await self._stop(key).wait()
        log.warning(
            "device cannot run",
            extra={"device": key, "reason": failed.error.reason, "error": failed.error.message},
        )
        self.failed[key] = failed
        await self._report(Report(Op.TWIN, key, failed.body()))
        failed.reported = True
        await self._save_view(key, failed.view())

    # -- reports and views -------------------------------------------------------------------

    async def _report(self, report: Report) -> None:
        coalesce = None if report.op == Op.TWIN else f"{report.op}:{uuid.uuid4().hex}"
        try:
            await self.report(report.op, report.key, report.body, coalesce)
        except StoreError as exc:
            # A full disk, say: the twin goes on; the next report tries again.
            log.warning("cannot queue report", extra={"device": report.key, "error": str(exc)})

    async def _save_view(self, key: str, view: dict[str, Any] | None) -> None:
        if view is not None:
            view = {**view, "updated": time.time()}
        try:
            await self.store.run(self.store.store.set_state, state_key(key), view)
        except StoreError as exc:
            log.warning("cannot save device view", extra={"device": key, "error": str(exc)})

    async def _save_index(self, keys: list[str]) -> None:
        if keys == self._index:
            return
        try:
            await self.store.run(self.store.store.set_state, INDEX_KEY, keys)
        except StoreError as exc:
            log.warning("cannot save device index", extra={"error": str(exc)})
            return
        self._index = keys


def load_views(store: Any) -> list[dict[str, Any]]:
    """Every device's last saved view, from a ``Store`` (for ``outpost device ls|get``)."""
    views = []
    for key in store.get_state(INDEX_KEY, []) or []:
        view = store.get_state(state_key(key))
        if view is not None:
            views.append(view)
    return views
