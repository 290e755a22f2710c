"""``outpost run``: the agent's top level. It builds the parts, each given what it needs, and
runs them in one nursery until SIGTERM; they meet in the store (see docs/architecture.md).

Writers commit to the store: the hub what the cloud sends (joined), the manifest writer the
folder's objects (standalone). Readers follow the store's change feed: the pod manager, the
device manager, the eventbus, the node reporter and the hub's outbox sender. Reports go up one
way, ``edge.upstream``: into the outbox, where the sender finds them.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from edge import defaults, sdnotify
from edge.datadir import IMAGES_DIR, STORE_FILE, saved_cloud_urls
from edge.devices.drivers import Buses
from edge.devices.manager import DeviceManager
from edge.hub.link import LINK_STATE_KEY
from edge.images import ImageStore
from edge.manifests import ManifestWriter
from edge.pods.cni import NetworkConfig
from edge.pods.manager import PodManager, report_status, store_objects, store_pods
from edge.pods.network import PodNetwork
from edge.pods.runc import Runc
from edge.pods.runtime import ContainerRuntime
from edge.pods.supervisor import Services
from edge.store import Store
from edge.store.aio import AsyncStore
from edge.upstream import Upstream

if TYPE_CHECKING:
    from edge.hub.client import HubConfig

log = logging.getLogger("edge.agent")


class AgentError(Exception):
    """The agent cannot start; the message says what to do."""


@dataclass
class RunOptions:
    data_dir: Path
    cloud_urls: tuple[str, ...] = ()
    manifests: Path | None = None  # standalone mode when set
    runc_root: Path = defaults.RUNC_ROOT
    pod_subnet: str = defaults.POD_SUBNET
    eventbus: str | None = defaults.EVENTBUS  # None: no eventbus
    outbox_budget: int = defaults.OUTBOX_BUDGET


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
            upstream = Upstream(aio, cloud=hub_config is not None)
            services = _pod_services(options, aio, upstream, node)
            pods = PodManager(services, store_pods(aio, node), follow=aio)
            devices = DeviceManager(aio, node, upstream.report, Buses())
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
                    if options.manifests is not None:
                        # The folder is in the store before the first reconcile: a pod that is
                        # still in it is adopted, not torn down as an orphan.
                        writer = ManifestWriter(options.manifests, node, aio)
                        await nursery.start(writer.run)
                    else:
                        assert hub_config is not None
                        _start_hub(nursery, aio, upstream, services.runc, hub_config, data_dir)
                    nursery.start_soon(pods.run)
                    nursery.start_soon(devices.run)
                    if options.eventbus:
                        # Imported only when wanted: the MQTT client code is not small.
                        from edge.devices.eventbus import EventBus

                        bus = EventBus(options.eventbus, node)
                        nursery.start_soon(bus.serve, aio, devices.set_desired)
                    await pods.adopted_ready.wait()
                    log.info("pods adopted", extra={"pods": len(pods.supervisors)})
                    systemd.ready(f"running, {len(pods.supervisors)} pods adopted")
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


def _start_hub(
    nursery: trio.Nursery,
    aio: AsyncStore,
    upstream: Upstream,
    runc: Runc,
    config: HubConfig,
    data_dir: Path,
) -> None:
    # Imported only when joined: standalone gateways do without the TLS, WebSocket and
    # certificate code (about 10 MB of memory).
    from edge.hub import link
    from edge.hub.client import EdgeHub
    from edge.node_reporter import NodeReporter

    state = link.LinkState()
    hub = EdgeHub(aio, config, state)
    reporter = NodeReporter(config.node, data_dir, runc, config.cloud_url, aio, upstream)
    nursery.start_soon(link.publish, aio, state)
    nursery.start_soon(hub.run)
    nursery.start_soon(reporter.run)


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


def _pod_services(options: RunOptions, aio: AsyncStore, upstream: Upstream, node: str) -> Services:
    data_dir = options.data_dir
    network = PodNetwork(
        data_dir / "network", NetworkConfig(subnet=ipaddress.ip_network(options.pod_subnet))
    )
    runtime = ContainerRuntime(
        data_dir,
        ImageStore(data_dir / IMAGES_DIR),
        network,
        store_objects(aio),
        node,
        cloud_tokens=options.manifests is None,
    )

    return Services(
        data_dir=data_dir,
        runc=Runc(options.runc_root),
        runtime=runtime,
        save_state=aio.set_state,
        load_state=aio.get_state,
        report=partial(report_status, upstream),
        event=upstream.event,
    )
