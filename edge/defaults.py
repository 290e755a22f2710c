"""Defaults the agent and its command line share.

They live apart from the modules that use them so that ``outpost --help`` and
``outpost version`` can show them without importing the agent (hundreds of modules, most of a
warm start's time in the native binary).
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path("/var/lib/outpost")
# On tmpfs: a reboot clears it, as it clears the containers it describes.
RUNC_ROOT = Path("/run/outpost/runc")
# Addresses of pods that do not use the host network (containerd's CNI examples use it too).
POD_SUBNET = "10.88.0.0/16"
# Where KubeEdge's mapper-style apps expect the node's broker.
EVENTBUS = "mqtt://127.0.0.1:1883"
# Bytes the outbox may hold while the cloud is away (see ``edge.store.outbox``).
OUTBOX_BUDGET = 64 * 1024 * 1024
