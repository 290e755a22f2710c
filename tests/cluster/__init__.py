"""A real Kubernetes control plane for tests, built from the Kubernetes Go modules.

``python -m tests.cluster build`` builds and caches the binaries; ``python -m tests.cluster up``
starts one for a person to use with kubectl. Tests get one through the ``control_plane`` fixture.
"""

from tests.cluster.controlplane import ControlPlane, ControlPlaneError

__all__ = ["ControlPlane", "ControlPlaneError"]
