"""TLS and mTLS on the ext_authz listeners (gRPC, and HTTP), for a central deployment (not
a loopback sidecar).

Certificates come from files and are re-read when they change: gRPC asks for the current
certificate on every new connection, and gets a new one only when a file's identity
(inode, size, modification time) changed, which also catches the symlink swap Kubernetes
does when it updates a mounted Secret. A changed set that does not load (half-written,
a key that does not match its certificate) is refused and the previous certificate stays
in use, so a bad rotation cannot take the listener down.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("mcp_authz")


@dataclass(frozen=True)
class TlsFiles:
    """The listener's certificate chain and key; with ``client_ca``, mTLS: every client
    must present a certificate issued by that CA."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


def _identity(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    stats = [os.stat(path) for path in files.paths()]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def load(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files: the key must match the certificate.

    Raises ``OSError`` (unreadable), ``ssl.SSLError`` or ``ValueError`` (not loadable).
    """
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(files.client_ca)
    return grpc.ssl_server_certificate_configuration(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.client_ca.read_bytes() if files.client_ca else None,
    )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that follow the files; raises at start if they do not load."""
    # The identity of the files in use, and of the last set that did not load (so a
    # broken rotation is reported once, not on every new connection). A file that cannot
    # even be stat'ed (mid-swap, deleted) counts as the identity "missing".
    seen: dict[str, object] = {"loaded": _identity(files), "failed": None}
    initial = load(files)

    def current() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on each new connection; None keeps the configuration in use.
        try:
            identity: object = _identity(files)
        except OSError:
            identity = "missing"
        if identity in (seen["loaded"], seen["failed"]):
            return None
        try:
            configuration = load(files)
        except (OSError, ssl.SSLError, ValueError) as exc:
            seen["failed"] = identity
            log.error("gRPC TLS files changed but do not load, keeping the previous: %s", exc)
            return None
        seen["loaded"] = identity
        log.info("gRPC TLS certificate reloaded from %s", files.cert)
        return configuration

    return grpc.dynamic_ssl_server_credentials(
        initial, current, require_client_authentication=files.client_ca is not None
    )


def _context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        context.load_verify_locations(files.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class FollowedContext:
    """The HTTP ext_authz listener's SSLContext, following the files like the gRPC one.

    asyncio keeps one context per listener, so a changed set that loads is loaded into
    that same context (new handshakes use it); :meth:`refresh` runs as each connection is
    accepted, before its handshake. A new client CA is added to the trusted ones (OpenSSL
    only adds): restart to withdraw a CA.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.loaded: object = _identity(files)
        self.failed: object = None
        self.context = _context(files)

    def refresh(self) -> None:
        try:
            identity: object = _identity(self.files)
        except OSError:
            identity = "missing"
        if identity in (self.loaded, self.failed):
            return
        try:
            _context(self.files)  # the whole set must load before any of it is used
            self.context.load_cert_chain(self.files.cert, self.files.key)
            if self.files.client_ca is not None:
                self.context.load_verify_locations(self.files.client_ca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failed = identity
            log.error("HTTP TLS files changed but do not load, keeping the previous: %s", exc)
            return
        self.loaded = identity
        log.info("HTTP TLS certificate reloaded from %s", self.files.cert)


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(server: grpc.aio.Server, address: str, files: TlsFiles | None) -> int:
    """Add the gRPC listener: plaintext (meant for loopback) or TLS. Returns the port."""
    if files is not None:
        return int(server.add_secure_port(address, server_credentials(files)))
    warn_if_exposed(address)
    return int(server.add_insecure_port(address))


def warn_if_exposed(address: str) -> None:
    """Log that a plaintext ext_authz listener is bound off loopback."""
    if not _loopback(address):
        log.warning(
            "ext_authz listens on %s without TLS: use --grpc-tls-cert/--grpc-tls-key "
            "(and --grpc-tls-client-ca) off loopback",
            address,
        )
