"""Defaults the cloud service and its command line share (the twin of ``edge.defaults``).

``outpost-cloud serve --help`` shows them, and the settings the service is built from start
from them, so each is said once.
"""

from __future__ import annotations

# Where edges connect, where Prometheus scrapes, where the one-line installer is served.
LISTEN = ("0.0.0.0", 8443)
METRICS_LISTEN = ("127.0.0.1", 9464)
INSTALLER_LISTEN = ("0.0.0.0", 8444)
# Seconds between heartbeats on an idle session; a node silent for three is offline.
HEARTBEAT_S = 15.0
# Connections between TCP accept and Welcome at once (reconnect storms).
MAX_HANDSHAKES = 64
# A connected node's Lease in kube-node-lease.
LEASE_RENEW_INTERVAL_S = 10.0
LEASE_DURATION_S = 40
# Each node's Events, per second and at once after a quiet spell.
EVENT_QPS = 5.0
EVENT_BURST = 25
# DeviceStatus: at most one write per device per interval, and at most qps in all.
DEVICE_STATUS_INTERVAL_S = 2.0
DEVICE_STATUS_QPS = 20.0
DEVICE_STATUS_BURST = 40
# How long a join token may be used.
TOKEN_TTL = "24h"
