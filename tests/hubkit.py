"""Certificates, a hub and edge hubs on loopback, for tests that drive the channel in-process.

Everything is real (TLS, WebSockets, SQLite); only Kubernetes is replaced, by a
``MemorySource`` of objects, where a test is about the channel and not the apiserver.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cloud.hub.tls import server_context
from cloud.pki import NODE_ORGANIZATION
from edge.hub.client import HubConfig
from tests.cluster.certs import CertificateAuthority, KeyPair


@dataclass
class Pki:
    ca: CertificateAuthority
    folder: Path

    @classmethod
    def create(cls, folder: Path) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        return cls(CertificateAuthority("outpost-test-ca"), folder)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.pair.cert_pem

    def server_context(self) -> ssl.SSLContext:
        pair = self.ca.issue("outpost-cloud", server_names=("127.0.0.1", "localhost"))
        return server_context(pair.cert_pem, pair.key_pem, self.ca_pem)

    def node_pair(self, node: str, organization: str = NODE_ORGANIZATION) -> KeyPair:
        return self.ca.issue(node, organizations=(organization,), client=True)

    def client_context(self, pair: KeyPair | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        if pair is not None:
            cert, key = pair.write(self.folder, f"client-{id(pair)}")
            ctx.load_cert_chain(cert, key)
        return ctx

    def edge_config(self, node: str, port: int, **kwargs: object) -> HubConfig:
        return HubConfig(
            cloud_url=f"https://127.0.0.1:{port}",
            node=node,
            ssl_context=self.client_context(self.node_pair(node)),
            **kwargs,  # type: ignore[arg-type]
        )
