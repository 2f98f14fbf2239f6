"""The part of trustme's API the TLS tests use, made with the ``openssl``
command line tool: for interpreters where trustme cannot be installed
(it needs ``cryptography``, which has no wheels for free-threaded CPython
yet). ``import_trustme()`` returns trustme when it is there, else this."""
from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import subprocess
import tempfile
from types import ModuleType
from typing import Any, List, Optional

import pytest


class Blob:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def bytes(self) -> bytes:
        return self._data

    def write_to_path(self, path: str, append: bool = False) -> None:
        with open(path, "ab" if append else "wb") as f:
            f.write(self._data)


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _san(identity: str) -> str:
    if "@" in identity:
        return f"email:{identity}"
    try:
        ipaddress.ip_address(identity)
        return f"IP:{identity}"
    except ValueError:
        return f"DNS:{identity}"


class LeafCert:
    def __init__(self, key: bytes, chain: List[bytes]) -> None:
        self.private_key_pem = Blob(key)
        self.cert_chain_pems = [Blob(c) for c in chain]

    def configure_cert(self, ctx: ssl.SSLContext) -> None:
        with tempfile.TemporaryDirectory() as d:
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            with open(cert, "wb") as f:
                f.write(b"".join(b.bytes() for b in self.cert_chain_pems))
            self.private_key_pem.write_to_path(key)
            ctx.load_cert_chain(cert, key)


class CA:
    """A self-signed CA (EC P-256, valid two days) that issues leaf certificates."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="netpoll-ca-")
        self._serial = 1
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                 "-subj", "/O=netpoll tests/CN=netpoll test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash", cwd=self._dir)
        with open(os.path.join(self._dir, "ca.pem"), "rb") as f:
            self.cert_pem = Blob(f.read())

    def configure_trust(self, ctx: ssl.SSLContext) -> None:
        ctx.load_verify_locations(cadata=self.cert_pem.bytes().decode())

    def issue_cert(self, *identities: str, common_name: Optional[str] = None,
                   **_: Any) -> LeafCert:
        d, n = self._dir, self._serial
        self._serial += 1
        cn = common_name or (identities[0] if identities else "netpoll test leaf")
        with open(os.path.join(d, f"leaf{n}.ext"), "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    "subjectKeyIdentifier=hash\n"
                    "authorityKeyIdentifier=keyid:always\n")
            if identities:
                f.write("subjectAltName=" + ",".join(_san(i) for i in identities) + "\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", f"leaf{n}.key", "-out", f"leaf{n}.csr",
                 "-subj", f"/O=netpoll tests/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"leaf{n}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-set_serial", str(1000 + n), "-days", "2", "-extfile", f"leaf{n}.ext",
                 "-out", f"leaf{n}.pem", cwd=d)
        with open(os.path.join(d, f"leaf{n}.key"), "rb") as f:
            key = f.read()
        with open(os.path.join(d, f"leaf{n}.pem"), "rb") as f:
            leaf = f.read()
        return LeafCert(key, [leaf])


def import_trustme() -> ModuleType:
    """trustme, or this module standing in for it; skips the calling test
    module when neither can make certificates."""
    if not os.environ.get("NETPOLL_TESTS_OPENSSL_CA"):     # set: use this module anyway
        try:
            import trustme
            return trustme
        except ImportError:
            pass
    if shutil.which("openssl") is None:
        pytest.skip("neither trustme nor the openssl tool is available", allow_module_level=True)
    import sys
    return sys.modules[__name__]
