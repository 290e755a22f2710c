"""Outpost's cloud service: bridges edge gateways to an unmodified Kubernetes API."""
