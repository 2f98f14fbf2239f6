"""Certificates for the TLS benchmarks, made at run time (nothing secret is stored).

``make_cert(directory)`` writes ``cert.pem`` (the leaf, then its CA) and
``key.pem`` for ``127.0.0.1`` into ``directory`` and returns both paths: with
``trustme`` when it is importable, otherwise with ``openssl req`` (an
ECDSA P-256 self-signed certificate valid for one day). Either way the key is
ECDSA P-256, so every server of a comparison does the same handshake work;
the load generator verifies nothing, so the CA is not needed by the client.
"""
from __future__ import annotations

import os
import shutil
import subprocess


def make_cert(directory: str) -> tuple[str, str]:
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    try:
        import trustme
    except ImportError:
        trustme = None
    if trustme is not None:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        with open(cert, "wb") as f:
            for pem in leaf.cert_chain_pems:
                f.write(pem.bytes())
        leaf.private_key_pem.write_to_path(key)
        return cert, key
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-subj", "/CN=127.0.0.1", "-days", "1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key
