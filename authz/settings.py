"""What ``mcp-authz serve`` runs with: one value, built once from its flags and the
``MCP_AUTHZ_*`` environment variables, with one set of defaults.

Every ``serve`` flag can also come from an ``MCP_AUTHZ_<FLAG>`` variable (``--grant-header``
is ``MCP_AUTHZ_GRANT_HEADER``), which is how the Kubernetes manifests configure it; a flag
on the command line wins over the environment, and the environment over the defaults of
:class:`Settings`. The value is checked where it is built (files that must load, flags that
go together), so whatever receives it, a worker process included, can rely on it.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from authz import tls
from authz.admin import load_tokens
from authz.audit import AUDIT_LEVELS, LOG_FORMATS
from authz.store import DEFAULT_TIMEOUT_S
from authz.tls import TlsFiles

ENV_PREFIX = "MCP_AUTHZ_"


@dataclass(frozen=True)
class Settings:
    # The policy file, loaded at start and watched for hot reload.
    policy_path: str
    # The counter store (and approvals) URL: redis://... or memory:// (one replica only).
    store_url: str
    # ext_authz over gRPC, and the list filter (ext_proc, gRPC only); "": not served
    # (``--grpc off``, with ``authz_http_address``).
    grpc_address: str = "127.0.0.1:9001"
    # ext_authz over Envoy's HTTP mode (authz/authz_http.py; envoy/envoy-http.yaml) on this
    # address, beside or instead of gRPC; "": not served.
    authz_http_address: str = ""
    # Health, readiness, metrics and (with admin tokens) the approvals API.
    http_address: str = "127.0.0.1:9002"
    # TLS (and with a client CA, mTLS) on the ext_authz listeners, gRPC and HTTP alike;
    # None: plaintext, for loopback.
    grpc_tls: TlsFiles | None = None
    # Take the grant id from this header (set by Envoy after verifying the caller).
    grant_header: str | None = None
    fail_open: bool = False
    # The bound on every call to the counter store.
    store_timeout_s: float = DEFAULT_TIMEOUT_S
    # On SIGTERM, keep answering this long after reporting NOT_SERVING.
    drain_seconds: float = 0.0
    # Re-read the policy file this often (<= 0: only on SIGHUP).
    reload_interval_s: float = 1.0
    # Serving processes under a supervising parent; 1: this process serves.
    workers: int = 1
    # Admin API tokens (token -> operator name); empty: approvals and the admin API are off.
    admin_tokens: Mapping[str, str] = field(default_factory=dict)
    # POST a notice here when an approval request opens ("" = none).
    approval_webhook: str = ""
    # The upstream MCP server whose tool list mcp-authz fetches at start and on every
    # reload ("" = learn it only from the lists clients ask for); see authz.upstream.
    upstream_url: str = ""
    log_level: str = "INFO"
    log_format: str = "json"
    audit_level: str = "info"

    @property
    def reuse_port(self) -> bool:
        """Share the ext_authz and HTTP ports with the other workers (SO_REUSEPORT). Off for a
        single process, which then refuses a port another process holds instead of silently
        splitting the traffic with it (gRPC's default on Linux)."""
        return self.workers > 1


class SettingsError(ValueError):
    """A flag or variable that cannot be used, worded for the operator."""


def _default(name: str) -> Any:
    for item in fields(Settings):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            return item.default_factory() if item.default_factory is not MISSING else None
    raise KeyError(name)


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class _Flag:
    """One ``serve`` flag: ``--name`` on the command line, ``MCP_AUTHZ_NAME`` in the
    environment, read with ``parse``; ``setting`` names the :class:`Settings` field it fills
    as is (None: :func:`from_arguments` derives fields from it)."""

    name: str
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    switch: bool = False
    setting: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.dest.upper()


_FLAGS = (
    _Flag("policy", "policy file (JSON or YAML); reloaded when it changes"),
    _Flag(
        "redis",
        "counter store URL: redis://, rediss://, unix://, redis+sentinel://, "
        "redis+cluster:// (README: Redis topologies)",
    ),
    _Flag(
        "store",
        "'memory' keeps counters in this process (one replica only)",
        choices=("redis", "memory"),
    ),
    _Flag(
        "grpc",
        f"ext_authz and the list filter over gRPC on HOST:PORT (default "
        f"{_default('grpc_address')}; 'off': none, with --authz-http)",
    ),
    _Flag(
        "authz-http",
        "ext_authz over Envoy's HTTP mode (http_service; envoy/envoy-http.yaml) on "
        "HOST:PORT, beside or instead of --grpc",
        setting="authz_http_address",
    ),
    _Flag(
        "http",
        f"health, metrics and admin API HOST:PORT (default {_default('http_address')})",
        setting="http_address",
    ),
    _Flag(
        "grpc-tls-cert",
        "serve ext_authz (gRPC and --authz-http) over TLS with this certificate chain "
        "(PEM; reloaded when it changes)",
    ),
    _Flag("grpc-tls-key", "the key of --grpc-tls-cert (PEM)"),
    _Flag("grpc-tls-client-ca", "mTLS: require client certificates issued by this CA (PEM)"),
    _Flag(
        "grant-header",
        "take the grant id from this header (set by Envoy after verifying the caller)",
        setting="grant_header",
    ),
    _Flag(
        "fail-open",
        "allow calls that need a counter when the store is down (default: deny, 503)",
        parse=_truthy,
        switch=True,
        setting="fail_open",
    ),
    _Flag(
        "store-timeout-ms",
        f"bound on every store call (default {_default('store_timeout_s') * 1000:g})",
        parse=int,
    ),
    _Flag(
        "drain-seconds",
        "on SIGTERM, keep answering this long after reporting NOT_SERVING "
        f"(default {_default('drain_seconds'):g})",
        parse=float,
        setting="drain_seconds",
    ),
    _Flag(
        "reload-interval",
        "re-read the policy file this often, in seconds, and reload it when it changed "
        f"(default {_default('reload_interval_s'):g}; 0: only on SIGHUP)",
        parse=float,
        setting="reload_interval_s",
    ),
    _Flag(
        "workers",
        "serving processes sharing the ports (SO_REUSEPORT) under a supervising parent "
        "that restarts them (default 1: this process serves); more than 1 needs --redis",
        parse=int,
    ),
    _Flag(
        "admin-tokens-file",
        "enable approvals and the admin API: a file of 'name:token' lines (the name is "
        "recorded as the operator); or set MCP_AUTHZ_ADMIN_TOKENS to the same entries",
    ),
    _Flag(
        "approval-webhook",
        "POST a notice (never argument values) here when an approval request opens",
        setting="approval_webhook",
    ),
    _Flag(
        "upstream-url",
        "the upstream MCP server (streamable HTTP) whose tool list (names, annotations) "
        "is fetched at start and on every reload; without it, the list is learnt from the "
        "tools/list responses clients ask for",
        setting="upstream_url",
    ),
    _Flag(
        "log-level",
        f"operational logs (stderr; default {_default('log_level')})",
        setting="log_level",
    ),
    _Flag(
        "log-format",
        "operational logs as JSON lines (default) or text",
        choices=tuple(LOG_FORMATS),
        setting="log_format",
    ),
    _Flag(
        "audit-level",
        "audit lines on stdout: info, every decision (default); warning, denials only",
        choices=tuple(AUDIT_LEVELS),
        setting="audit_level",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags. Their parsed default is None: :func:`from_arguments` then
    takes the environment variable, else the default of :class:`Settings`."""
    for flag in _FLAGS:
        if flag.switch:
            parser.add_argument(f"--{flag.name}", action="store_const", const=True, help=flag.help)
        else:
            parser.add_argument(
                f"--{flag.name}", type=flag.parse, choices=flag.choices, help=flag.help
            )


def _given(arguments: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Each flag's value from the command line, else its variable; absent ones left out."""
    given: dict[str, Any] = {}
    for flag in _FLAGS:
        if arguments.get(flag.dest) is not None:
            given[flag.dest] = arguments[flag.dest]
            continue
        text = environ.get(flag.variable)
        if text is None or (text == "" and not flag.switch):
            continue
        try:
            value = flag.parse(text)
        except ValueError:
            raise SettingsError(f"{flag.variable}={text!r} is not a valid --{flag.name}") from None
        if flag.choices is not None and value not in flag.choices:
            raise SettingsError(
                f"{flag.variable}={text!r}: choose one of {', '.join(flag.choices)}"
            )
        given[flag.dest] = value
    return given


def from_arguments(arguments: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """The settings of ``mcp-authz serve`` from its parsed flags and the environment."""
    given = _given(arguments, environ)
    policy = given.get("policy")
    if not policy:
        raise SettingsError("--policy (or MCP_AUTHZ_POLICY) is required")
    redis, store = given.get("redis"), given.get("store")
    if redis and store == "memory":
        raise SettingsError("choose --redis URL or --store memory, not both")
    if not redis and store != "memory":
        raise SettingsError("a counter store is required: --redis URL or --store memory")
    workers = given.get("workers", _default("workers"))
    if workers < 1 or (workers > 1 and not redis):
        raise SettingsError(
            "--workers must be 1, or more with --redis (with the memory store every worker "
            "would keep its own counters)"
        )
    grpc = given.get("grpc", _default("grpc_address"))
    if grpc == "off":
        grpc = ""
    if not grpc and not given.get("authz_http"):
        raise SettingsError("--grpc off needs --authz-http HOST:PORT")
    timeout_ms = given.get("store_timeout_ms")
    if timeout_ms is not None and timeout_ms <= 0:
        raise SettingsError("--store-timeout-ms must be positive")
    try:
        admin_tokens = load_tokens(
            given.get("admin_tokens_file"), environ.get(ENV_PREFIX + "ADMIN_TOKENS")
        )
    except (OSError, ValueError) as exc:
        raise SettingsError(f"admin tokens: {exc}") from None
    optional = {f.setting: given[f.dest] for f in _FLAGS if f.setting and f.dest in given}
    if timeout_ms is not None:
        optional["store_timeout_s"] = timeout_ms / 1000
    return Settings(
        policy_path=policy,
        store_url=redis or "memory://",
        grpc_address=grpc,
        grpc_tls=_grpc_tls(given),
        workers=workers,
        admin_tokens=admin_tokens,
        **optional,
    )


def _grpc_tls(given: Mapping[str, Any]) -> TlsFiles | None:
    """The gRPC listener's TLS files, checked to load."""
    cert, key, client_ca = (
        given.get(name) for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca")
    )
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise SettingsError(
            "--grpc-tls-cert and --grpc-tls-key go together (--grpc-tls-client-ca needs both)"
        )
    files = TlsFiles(
        cert=Path(cert), key=Path(key), client_ca=Path(client_ca) if client_ca else None
    )
    try:
        tls.load(files)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise SettingsError(f"gRPC TLS files do not load: {exc}") from None
    return files
