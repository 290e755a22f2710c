"""``outpost run``: the agent's top level, wiring the store, the cloud link and (as they are
built) pods and devices into one trio program that runs until SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from edge import defaults, node_info, sdnotify
from edge.devices.drivers import Buses
from edge.devices.manager import DeviceManager, ManifestDevices
from edge.images import ImageStore
from edge.pods import status as pod_status
from edge.pods.cni import NetworkConfig
from edge.pods.manager import PodManager
from edge.pods.network import PodNetwork
from edge.pods.runc import Runc
from edge.pods.runtime import ContainerRuntime
from edge.pods.sources import ManifestFolder, store_objects, store_pods
from edge.pods.supervisor import Services
from edge.store import DEFAULT_OUTBOX_BUDGET, Store
from edge.store.aio import AsyncStore
from edge.version import __version__
from edge.wire.events import Op
from edge.wire.keys import node_key

if TYPE_CHECKING:
    from edge.hub.client import EdgeHub, HubConfig
    from edge.hub.link import LinkState

log = logging.getLogger("edge.agent")

STORE_FILE = "store.db"
CLOUD_URL_FILE = "cloud-url"
LINK_STATE_KEY = "cloud.link"
# How often to look for reports other processes queued in the store.
OUTBOX_POLL_S = 1.0
IMAGE_GC_INTERVAL_S = 600.0
# The node's status goes up at start, on every reconnect, and this often when it changed.
NODE_STATUS_INTERVAL_S = 60.0
# How often standalone mode reads Devices from the manifests folder again.
MANIFEST_DEVICES_RESYNC_S = 5.0


class AgentError(Exception):
    """The agent cannot start; the message says what to do."""


def saved_cloud_urls(data_dir: Path) -> list[str]:
    """The cloud URLs saved at join, one a line: replicas of one cloud, tried in turn."""
    path = data_dir / CLOUD_URL_FILE
    return path.read_text().split() if path.exists() else []


def saved_cloud_url(data_dir: Path) -> str | None:
    return next(iter(saved_cloud_urls(data_dir)), None)


def save_cloud_url(data_dir: Path, url: str) -> None:
    (data_dir / CLOUD_URL_FILE).write_text(url + "\n")


@dataclass
class RunOptions:
    data_dir: Path
    cloud_urls: tuple[str, ...] = ()
    manifests: Path | None = None  # standalone mode when set
    runc_root: Path = defaults.RUNC_ROOT
    pod_subnet: str = "10.88.0.0/16"
    eventbus: str | None = None
    outbox_budget: int = DEFAULT_OUTBOX_BUDGET


async def run(options: RunOptions) -> None:
    # Signals first: a SIGTERM during start-up must stop the agent cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # Read and removed from the environment at once: runc must not inherit NOTIFY_SOCKET.
        systemd = sdnotify.Notifier.from_environ()
        data_dir = options.data_dir
        hub_config = None
        if options.manifests is None:
            hub_config = _hub_config(data_dir, options.cloud_urls)
            node = hub_config.node
        else:
            node = socket.gethostname().lower()
        data_dir.mkdir(parents=True, exist_ok=True)
        with Store(data_dir / STORE_FILE, outbox_budget=options.outbox_budget) as store:
            aio = AsyncStore(store)
            hub: EdgeHub | None = None
            folder = ManifestFolder(options.manifests, node) if options.manifests else None
            services = _pod_services(options, aio, node, folder, lambda: hub)
            manager = PodManager(services, folder.pods if folder else store_pods(aio, node))
            devices = _device_manager(options, aio, node, lambda: hub)
            if hub_config is not None:
                # Imported only when joined: standalone gateways do without the TLS, WebSocket
                # and certificate code (about 10 MB of memory).
                from edge.hub.client import EdgeHub
                from edge.hub.link import LinkState

                link = LinkState()

                def applied(keys: tuple[str, ...]) -> None:
                    manager.changed()
                    manager.objects_changed(keys)
                    devices.changed(keys)

                hub = EdgeHub(aio, hub_config, link, on_applied=applied)
            log.info(
                "agent started",
                extra={
                    "node": node,
                    "cloud": ",".join(hub_config.cloud_urls) if hub_config else "(standalone)",
                    "hwm": store.hwm,
                    "data_dir": data_dir,
                },
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(systemd.feed_watchdog)
                    nursery.start_soon(manager.run)
                    nursery.start_soon(devices.run)
                    if options.eventbus:
                        # Imported only when wanted: the MQTT client code is not small.
                        from edge.devices.eventbus import EventBus

                        bus = EventBus(options.eventbus, node)
                        nursery.start_soon(bus.serve, devices)
                    nursery.start_soon(_collect_images, manager, services.runtime)
                    if hub is not None:
                        nursery.start_soon(hub.run)
                        nursery.start_soon(_publish_link, aio, link)
                        nursery.start_soon(_watch_outbox, aio, hub)
                        nursery.start_soon(_report_pods_on_reconnect, link, manager)
                        nursery.start_soon(_report_devices_on_reconnect, link, devices)
                        read_node = _node_status(node, data_dir, services.runc, hub_config)
                        nursery.start_soon(_report_node, hub, link, node, read_node)
                    await manager.adopted_ready.wait()
                    log.info("pods adopted", extra={"pods": len(manager.supervisors)})
                    systemd.ready(f"running, {len(manager.supervisors)} pods adopted")
                    async for signum in signals:
                        # Pods keep running: the next agent adopts them.
                        log.info("stopping", extra={"signal": signal.Signals(signum).name})
                        systemd.stopping("stopping; pods keep running")
                        nursery.cancel_scope.cancel()
                        break
            finally:
                # Worker threads are done once the nursery is: the store is ours again.
                store.set_state(
                    LINK_STATE_KEY,
                    {"online": False, "since": time.time(), "reason": "agent stopped"},
                )


def _hub_config(data_dir: Path, cloud_urls: tuple[str, ...]) -> HubConfig:
    from edge import identity
    from edge.hub.client import HubConfig

    try:
        me = identity.load_identity(data_dir)
        if me is None:
            raise AgentError(
                f"this gateway has not joined a cloud ({data_dir / 'identity'} is empty):"
                " run `outpost join` first, or `outpost run --standalone`"
            )
        urls = list(cloud_urls) or saved_cloud_urls(data_dir)
        if not urls:
            raise AgentError(f"no cloud URL: pass --cloud, or join again to save it in {data_dir}")
        return HubConfig(
            cloud_url=urls[0],
            fallback_urls=tuple(urls[1:]),
            node=me.node,
            ssl_context=identity.client_ssl_context(me),
        )
    except identity.IdentityError as exc:
        raise AgentError(str(exc)) from exc


def _pod_services(
    options: RunOptions,
    aio: AsyncStore,
    node: str,
    folder: ManifestFolder | None,
    hub: Callable[[], EdgeHub | None],
) -> Services:
    data_dir = options.data_dir
    network = PodNetwork(
        data_dir / "network", NetworkConfig(subnet=ipaddress.ip_network(options.pod_subnet))
    )
    runtime = ContainerRuntime(
        data_dir,
        ImageStore(data_dir / "images"),
        network,
        folder.objects if folder else store_objects(aio),
        node,
        cloud_tokens=folder is None,
    )

    async def save_state(key: str, value: Any) -> None:
        if value is None:
            await aio.run(aio.store.delete_state, key)
        else:
            await aio.run(aio.store.set_state, key, value)

    async def load_state(key: str) -> Any:
        return await aio.run(aio.store.get_state, key)

    def report_and_remember(key: str, body: dict[str, Any]) -> None:
        # The summary is kept apart from the outbox, which forgets a report once the cloud has
        # it (and in standalone mode has no cloud): `outpost status` lists the pods from it.
        # One commit for both: a status report is the pods' most frequent write.
        state = pod_status.SUMMARY_STATE + body["uid"]
        with aio.store.batch():
            aio.store.report(Op.STATUS, key, body)
            if body.get("stopped"):
                aio.store.delete_state(state)
            else:
                aio.store.set_state(state, pod_status.summary(key, body))

    async def report(key: str, body: dict[str, Any]) -> None:
        await aio.run(report_and_remember, key, body)
        current = hub()
        if current is not None:
            current.outbox_changed()

    async def event(key: str, body: dict[str, Any]) -> None:
        if folder is not None:
            return  # standalone: no cloud to tell, and the outbox would only fill up
        # Events are never merged: each has its own coalescing key.
        await aio.run(aio.store.report, Op.EVENT, key, body, "", f"event:{uuid.uuid4().hex}")
        current = hub()
        if current is not None:
            current.outbox_changed()

    return Services(
        data_dir=data_dir,
        runc=Runc(options.runc_root),
        runtime=runtime,
        save_state=save_state,
        load_state=load_state,
        report=report,
        event=event,
    )


def _device_manager(
    options: RunOptions, aio: AsyncStore, node: str, hub: Callable[[], EdgeHub | None]
) -> DeviceManager:
    """The node's devices: from the store (joined) or the manifests folder (standalone)."""
    standalone = options.manifests is not None

    async def report(op: Op, key: str, body: dict[str, Any], coalesce_key: str | None) -> None:
        if standalone:
            return  # no cloud to tell; `outpost device ls|get` reads the views in the store
        await aio.run(aio.store.report, op, key, body, "", coalesce_key)
        current = hub()
        if current is not None:
            current.outbox_changed()

    if options.manifests is not None:
        return DeviceManager(
            aio,
            node,
            report,
            Buses(),
            source=ManifestDevices(options.manifests, node),
            resync_s=MANIFEST_DEVICES_RESYNC_S,
        )
    return DeviceManager(aio, node, report, Buses())


async def _collect_images(manager: PodManager, runtime: ContainerRuntime) -> None:
    """Keep images within their disk budget: those no pod here uses go, least recent first."""
    while True:
        await trio.sleep(IMAGE_GC_INTERVAL_S)
        in_use = {
            c.get("image", "")
            for supervisor in list(manager.supervisors.values())
            for c in (
                *supervisor.pod["spec"].get("initContainers", []),
                *supervisor.pod["spec"].get("containers", []),
            )
        }
        result = await trio.to_thread.run_sync(runtime.images.gc, in_use)
        if result.removed_images or result.removed_blobs:
            log.info(
                "images collected",
                extra={"images": len(result.removed_images), "freed_bytes": result.freed_bytes},
            )


async def _publish_link(aio: AsyncStore, link: LinkState) -> None:
    """Keep the link state in the store, where `outpost status` and other processes read it."""
    while True:
        state = {"online": link.online, "since": link.since, "reason": link.reason}
        await aio.run(aio.store.set_state, LINK_STATE_KEY, state)
        await link.wait_change()


async def _went_online(link: LinkState) -> None:
    while not await link.wait_change():
        pass


async def _report_pods_on_reconnect(link: LinkState, manager: PodManager) -> None:
    """While the node was away the node lifecycle controller may have marked its pods not
    ready: every pod reports again once the link is back."""
    while True:
        await _went_online(link)
        manager.report_again()


async def _report_devices_on_reconnect(link: LinkState, devices: DeviceManager) -> None:
    """Device twins go up again once the link is back: a cheap guard against a cloud that lost
    them (the outbox already kept the latest of each while the link was down)."""
    while True:
        await _went_online(link)
        devices.report_again()


def _node_status(
    node: str, data_dir: Path, runc: Runc, config: HubConfig
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Reads the node's status report (``edge.node_info``) from the host, in a worker thread."""
    cloud_host = urlsplit(config.cloud_url).hostname
    runc_version: str | None = None

    async def read() -> dict[str, Any]:
        nonlocal runc_version
        if runc_version is None:
            runc_version = node_info.parse_runc_version(await runc.version())
        facts = await trio.to_thread.run_sync(
            lambda: node_info.read_facts(data_dir, runc_version=runc_version, cloud_host=cloud_host)
        )
        return node_info.node_status(node, facts, __version__)

    return read


async def _report_node(
    hub: EdgeHub, link: LinkState, node: str, read: Callable[[], Awaitable[dict[str, Any]]]
) -> None:
    """The ``/Node/<node>`` status: at start, on every reconnect, and every minute if it
    changed."""
    last: dict[str, Any] | None = None
    due = True
    while True:
        body = await read()
        if due or body != last:
            await hub.report(Op.STATUS, node_key(node), body)
            log.info(
                "node status reported",
                extra={"conditions": {c["type"]: c["status"] for c in body["conditions"]}},
            )
            last = body
        due = False
        with trio.move_on_after(NODE_STATUS_INTERVAL_S):
            await _went_online(link)
            due = True


async def _watch_outbox(aio: AsyncStore, hub: EdgeHub) -> None:
    version = await aio.run(lambda: aio.store.data_version)
    while True:
        await trio.sleep(OUTBOX_POLL_S)
        now = await aio.run(lambda: aio.store.data_version)
        if now != version:
            version = now
            hub.outbox_changed()


def status(data_dir: Path) -> dict[str, object]:
    """What `outpost status` shows, read from the store and the identity."""
    from edge import identity

    path = data_dir / STORE_FILE
    if not path.exists():
        raise AgentError(f"no store at {path}: the agent has not run with --data-dir {data_dir}")
    me = identity.load_identity(data_dir)
    with Store(path) as store:
        link = store.get_state(
            LINK_STATE_KEY, {"online": False, "since": 0.0, "reason": "never connected"}
        )
        size, entries = store.outbox_size()
        return {
            "node": me.node if me else None,
            "cloud": saved_cloud_url(data_dir),
            "link": link,
            "hwm": store.hwm,
            "objects": store.counts(),
            "pods": {
                summary.pop("pod"): summary for _, summary in store.states(pod_status.SUMMARY_STATE)
            },
            "outbox": {"entries": entries, "bytes": size},
            "dropped": {str(op): n for op, n in store.dropped.items()},
        }
