"""Running Kubernetes pods on runc: manifests, OCI runtime specs, volumes and supervision."""
