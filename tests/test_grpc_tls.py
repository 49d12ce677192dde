"""TLS and mTLS on the gRPC listener (central deployment), with real certificates and the
real Envoy as the client; certificates reloaded from their files without a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authz.pb import external_auth_pb2_grpc
from devstack.checks import check_request
from devstack.stack import (
    BIN,
    Proc,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    upstream_proc,
    wait_ready,
)
from tests.support.load import client_headers, stateless, tool_call
from tests.support.reliability import record

pytestmark = pytest.mark.e2e

SERVER_NAME = "mcp-authz.internal"
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {"containerize_app": {"action": "allow"}, "delete_app": {"action": "deny"}},
}
_figures: dict[str, Any] = {}


# --- a throwaway PKI ----------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_ca(name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def issue(ca: Issuer, name: str, *, server: bool) -> tuple[bytes, bytes, int]:
    """A leaf certificate and key (PEM) signed by ``ca``, and its serial number."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    if server:
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial


def replace_file(path: Path, data: bytes) -> None:
    """Write then rename, as a rotation tool (or Kubernetes' symlink swap) does."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    os.replace(staged, path)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Issuer
    server_serial: int

    def path(self, name: str) -> Path:
        return self.directory / name

    def ca_pem(self) -> bytes:
        """The original CA, which clients trust for the server's certificate."""
        return self.ca.cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca = new_ca("mcp-authz test CA")
    rogue = new_ca("someone else's CA")
    (directory / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    # What mcp-authz trusts for client certificates (rotated on its own in a test).
    (directory / "client-ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    cert, key, serial = issue(ca, SERVER_NAME, server=True)
    (directory / "server.pem").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    cert, key, _ = issue(ca, "envoy", server=False)
    (directory / "client.pem").write_bytes(cert)
    (directory / "client.key").write_bytes(key)
    cert, key, _ = issue(rogue, "envoy", server=False)
    (directory / "rogue.pem").write_bytes(cert)
    (directory / "rogue.key").write_bytes(key)
    return Pki(directory, ca, serial)


@pytest.fixture(scope="module", autouse=True)
def _record_figures() -> Iterator[None]:
    yield
    if _figures:
        record(
            "gRPC listener TLS and mTLS",
            "mcp-authz serving ext_authz over TLS/mTLS with certificates from files, the "
            "real Envoy as the client; certificates rotated on disk while it runs.",
            dict(sorted(_figures.items())),
        )


# --- the processes ------------------------------------------------------------------------


def tls_args(pki: Pki, *, mtls: bool) -> list[str]:
    args = [
        "--grpc-tls-cert",
        str(pki.path("server.pem")),
        "--grpc-tls-key",
        str(pki.path("server.key")),
    ]
    if mtls:
        args += ["--grpc-tls-client-ca", str(pki.path("client-ca.pem"))]
    return args


def envoy_over_tls(tmp: Path, pki: Pki, client_cert: str | None, **ports: Any) -> Path:
    """The shipped envoy.yaml, talking TLS to mcp-authz (with a client certificate)."""
    directory = tmp / f"envoy-{client_cert or 'no-cert'}"
    directory.mkdir()
    path = envoy_config(directory, **ports)
    config = yaml.safe_load(path.read_text())
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(pki.path("ca.pem"))},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}
            ],
        },
    }
    if client_cert:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(pki.path(f"{client_cert}.pem"))},
                "private_key": {"filename": str(pki.path(f"{client_cert}.key"))},
            }
        ]
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "mcp_authz":
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "UpstreamTlsContext",
                    "sni": SERVER_NAME,
                    "common_tls_context": common,
                },
            }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class TlsStack:
    url: str
    grpc_port: int
    authz: Proc
    record: Path
    listen: dict[str, int]

    def recorded_tools(self) -> list[str]:
        if not self.record.exists():
            return []
        rows = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [m.get("tool") for r in rows for m in (r["jsonrpc"] or [])]


def start(
    stack: ExitStack, tmp: Path, pki: Pki, *, mtls: bool, envoys: list[str | None]
) -> TlsStack:
    """mcp-authz over TLS, the demo upstream, and one Envoy per client certificate."""
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    grpc_port, upstream = free_port(), free_port()
    record_file = tmp / "upstream-record.jsonl"
    stack.enter_context(running(stateless(upstream_proc(tmp, upstream, record_file)), upstream))
    authz = stack.enter_context(
        running(
            authz_proc(
                tmp,
                policy,
                grpc_port,
                free_port(),
                ["--store", "memory"],
                *tls_args(pki, mtls=mtls),
            ),
            grpc_port,
        )
    )
    listen: dict[str, int] = {}
    for client_cert in envoys:
        port, admin = free_port(), free_port()
        config = envoy_over_tls(
            tmp, pki, client_cert, listen=port, authz=grpc_port, upstream=upstream, admin=admin
        )
        proc = envoy_proc(tmp, config)
        proc.log = tmp / f"envoy-{client_cert or 'no-cert'}.log"
        stack.enter_context(running(proc, port))
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        listen[client_cert or "none"] = port
    return TlsStack(
        url="http://127.0.0.1:{}/mcp",
        grpc_port=grpc_port,
        authz=authz,
        record=record_file,
        listen=listen,
    )


def post(stack: TlsStack, envoy: str, body: bytes) -> httpx.Response:
    url = stack.url.format(stack.listen[envoy])
    return httpx.post(url, content=body, headers=client_headers("tls"), timeout=10)


def direct_check(
    port: int, pki: Pki, *, client: str | None, tls: bool = True
) -> grpc.StatusCode | None:
    """A Check straight to mcp-authz; None when it answered, else the failure's code."""
    if not tls:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem(),
            private_key=pki.path(f"{client}.key").read_bytes() if client else None,
            certificate_chain=pki.path(f"{client}.pem").read_bytes() if client else None,
        )
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
        )
    with channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = check_request(tool_call("delete_app", 1), {"content-type": "application/json"})
        try:
            stub.Check(request, timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return None


def served_serial(port: int, pki: Pki) -> int:
    """The serial number of the certificate mcp-authz presents to a new connection."""
    context = ssl.create_default_context(cadata=pki.ca_pem().decode())
    context.load_cert_chain(pki.path("client.pem"), pki.path("client.key"))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def wait_for_serial(port: int, pki: Pki, serial: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    seen = served_serial(port, pki)
    while seen != serial and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = served_serial(port, pki)
    return seen


# --- tests --------------------------------------------------------------------------------


def test_tls_listener_with_envoy_as_the_client(tmp_path: Path, pki: Pki) -> None:
    with ExitStack() as stack:
        s = start(stack, tmp_path, pki, mtls=False, envoys=[None])
        denied = post(s, "none", tool_call("delete_app", 1, app_name="x"))
        allowed = post(s, "none", tool_call("containerize_app", 2, app_path="/a"))
        plaintext = direct_check(s.grpc_port, pki, client=None, tls=False)
        tools = s.recorded_tools()
    assert denied.status_code == 403, denied.text
    assert denied.json()["error"]["data"]["reason"] == "denied_by_rule"
    assert allowed.status_code == 200, allowed.text
    assert "Containerized /a" in allowed.text
    assert tools == ["containerize_app"]
    assert plaintext is grpc.StatusCode.UNAVAILABLE
    _figures["TLS: checks answered through Envoy"] = 2
    _figures["TLS: plaintext client refused"] = "yes"


def test_mtls_admits_only_clients_of_the_ca(tmp_path: Path, pki: Pki) -> None:
    with ExitStack() as stack:
        s = start(stack, tmp_path, pki, mtls=True, envoys=["client", None, "rogue"])
        trusted = post(s, "client", tool_call("delete_app", 1, app_name="x"))
        trusted_allowed = post(s, "client", tool_call("containerize_app", 2, app_path="/a"))
        # Envoys without a certificate, or with one from another CA: the handshake fails,
        # Envoy fails closed (503) and nothing reaches the upstream.
        no_cert = post(s, "none", tool_call("containerize_app", 3, app_path="/b"))
        rogue = post(s, "rogue", tool_call("containerize_app", 4, app_path="/c"))
        direct = {
            client: direct_check(s.grpc_port, pki, client=client)
            for client in ("client", None, "rogue")
        }
        tools = s.recorded_tools()
    assert trusted.status_code == 403 and trusted.json()["error"]["data"]["reason"] == (
        "denied_by_rule"
    )
    assert trusted_allowed.status_code == 200, trusted_allowed.text
    assert no_cert.status_code == 503 and "x-mcp-authz-reason" not in no_cert.headers
    assert rogue.status_code == 503 and "x-mcp-authz-reason" not in rogue.headers
    assert tools == ["containerize_app"]
    assert direct["client"] is None
    assert direct[None] is grpc.StatusCode.UNAVAILABLE
    assert direct["rogue"] is grpc.StatusCode.UNAVAILABLE
    _figures["mTLS: clients refused (no certificate, other CA; via Envoy and direct)"] = 4


def test_certificates_reload_when_the_files_change(tmp_path: Path, pki: Pki) -> None:
    with ExitStack() as stack:
        s = start(stack, tmp_path, pki, mtls=True, envoys=["client"])
        assert s.authz.popen is not None
        pid = s.authz.popen.pid
        first = served_serial(s.grpc_port, pki)

        # Rotate the server certificate and key: new connections get the new one.
        cert, key, rotated = issue(pki.ca, SERVER_NAME, server=True)
        replace_file(pki.path("server.key"), key)
        replace_file(pki.path("server.pem"), cert)
        picked_up = wait_for_serial(s.grpc_port, pki, rotated)
        through_envoy = post(s, "client", tool_call("delete_app", 5, app_name="x"))

        # A broken rotation (a key that does not match) is refused: the previous stays.
        _, other_key, _ = issue(pki.ca, SERVER_NAME, server=True)
        replace_file(pki.path("server.key"), other_key)
        kept = served_serial(s.grpc_port, pki)
        still_answers = direct_check(s.grpc_port, pki, client="client")
        replace_file(pki.path("server.key"), key)

        # Rotate the client CA: a certificate of the old CA is refused on new connections.
        replace_file(
            pki.path("client-ca.pem"),
            new_ca("rotated client CA").cert.public_bytes(serialization.Encoding.PEM),
        )
        deadline = time.monotonic() + 10
        refused = direct_check(s.grpc_port, pki, client="client")
        while refused is None and time.monotonic() < deadline:
            time.sleep(0.1)
            refused = direct_check(s.grpc_port, pki, client="client")
        same_process = s.authz.popen.poll() is None and s.authz.popen.pid == pid
        log = s.authz.output()
    assert first == pki.server_serial
    assert picked_up == rotated
    assert through_envoy.status_code == 403, through_envoy.text
    assert kept == rotated
    assert still_answers is None
    assert refused is grpc.StatusCode.UNAVAILABLE
    assert same_process
    assert "reloaded" in log and "do not load" in log
    _figures["rotations picked up without a restart (server certificate, client CA)"] = 2
    _figures["broken rotations refused, previous certificate kept"] = 1


def test_serve_refuses_tls_files_that_do_not_load(tmp_path: Path, pki: Pki) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    base = [str(BIN / "mcp-authz"), "serve", "--policy", str(policy), "--store", "memory"]
    cases = {
        "cert without key": ["--grpc-tls-cert", str(pki.path("server.pem"))],
        "client CA alone": ["--grpc-tls-client-ca", str(pki.path("ca.pem"))],
        "key of another certificate": [
            "--grpc-tls-cert",
            str(pki.path("server.pem")),
            "--grpc-tls-key",
            str(pki.path("client.key")),
        ],
        "missing file": [
            "--grpc-tls-cert",
            str(tmp_path / "nope.pem"),
            "--grpc-tls-key",
            str(pki.path("server.key")),
        ],
    }
    for name, args in cases.items():
        result = subprocess.run(
            [
                *base,
                *args,
                "--grpc",
                f"127.0.0.1:{free_port()}",
                "--http",
                f"127.0.0.1:{free_port()}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (name, result.stderr)
        assert "grpc-tls" in result.stderr or "TLS" in result.stderr, (name, result.stderr)
