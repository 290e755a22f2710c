"""TLS contexts for the hub: it serves with a certificate from the cloud's CA and accepts (but
does not require, since joining nodes have none yet) client certificates from the same CA."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path


def server_context(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads only files: hand it a private folder that is gone right after.
    with tempfile.TemporaryDirectory(prefix="outpost-tls-") as folder:
        cert, key = Path(folder, "tls.crt"), Path(folder, "tls.key")
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        cert.write_bytes(cert_pem)
        ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
