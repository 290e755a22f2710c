"""What ``outpost status`` shows: the node, its cloud link, its pods and what the store holds,
read from the store and the identity, whether or not the agent runs."""

from __future__ import annotations

from pathlib import Path

from edge.datadir import STORE_FILE, saved_cloud_url
from edge.hub.link import LINK_STATE_KEY, NEVER_CONNECTED
from edge.pods.status import SUMMARY_STATE
from edge.store import Store


class StatusError(Exception):
    """There is nothing to show; the message says why."""


def read_status(data_dir: Path) -> dict[str, object]:
    from edge import identity

    path = data_dir / STORE_FILE
    if not path.exists():
        raise StatusError(f"no store at {path}: the agent has not run with --data-dir {data_dir}")
    me = identity.load_identity(data_dir)
    with Store(path) as store:
        size, entries = store.outbox_size()
        return {
            "node": me.node if me else None,
            "cloud": saved_cloud_url(data_dir),
            "link": store.get_state(LINK_STATE_KEY, NEVER_CONNECTED),
            "hwm": store.hwm,
            "objects": store.counts(),
            "pods": {summary.pop("pod"): summary for _, summary in store.states(SUMMARY_STATE)},
            "outbox": {"entries": entries, "bytes": size},
            "dropped": {str(op): n for op, n in store.dropped.items()},
        }
