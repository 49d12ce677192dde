"""The ``mcp-authz`` command: ``serve``, and ``check-policy``, ``explain`` and ``test`` for
policy authors (see :mod:`authz.tooling`).

Every ``serve`` flag can also come from an ``MCP_AUTHZ_<FLAG>`` environment variable
(``--grant-header`` is ``MCP_AUTHZ_GRANT_HEADER``), which is how the Kubernetes manifests
configure it; a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from authz import admin, tls, tooling
from authz.approvals import open_book
from authz.audit import AUDIT_LEVELS, LOG_FORMATS, configure_logging
from authz.engine import Engine
from authz.metrics import InstrumentedStore, Metrics
from authz.policy import PolicyError, load_policy
from authz.server import Settings, serve
from authz.store import open_store
from authz.tls import TlsFiles
from authz.workers import supervise

ENV_PREFIX = "MCP_AUTHZ_"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-authz", description="Policy-enforcing Envoy ext_authz service for MCP servers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("serve", help="run the ext_authz gRPC service")
    run.add_argument("--policy", default=_env("policy"), help="policy file (JSON)")
    run.add_argument(
        "--redis",
        default=_env("redis"),
        help="counter store URL: redis://, rediss://, unix://, redis+sentinel://, "
        "redis+cluster:// (README: Redis topologies)",
    )
    run.add_argument(
        "--store",
        choices=["redis", "memory"],
        default=_env("store"),
        help="'memory' keeps counters in this process (one replica only)",
    )
    run.add_argument(
        "--grpc",
        default=_env("grpc", "127.0.0.1:9001"),
        help="ext_authz over gRPC on HOST:PORT ('off': none, with --authz-http)",
    )
    run.add_argument(
        "--authz-http",
        default=_env("authz-http", ""),
        metavar="HOST:PORT",
        help="ext_authz over HTTP (Envoy's http_service; envoy/envoy-http.yaml) on HOST:PORT, "
        "beside or instead of --grpc",
    )
    run.add_argument("--http", default=_env("http", "127.0.0.1:9002"), help="health HOST:PORT")
    run.add_argument(
        "--grpc-tls-cert",
        default=_env("grpc-tls-cert"),
        help="serve ext_authz (gRPC and --authz-http) over TLS with this certificate chain "
        "(PEM; reloaded when it changes)",
    )
    run.add_argument(
        "--grpc-tls-key", default=_env("grpc-tls-key"), help="the key of --grpc-tls-cert (PEM)"
    )
    run.add_argument(
        "--grpc-tls-client-ca",
        default=_env("grpc-tls-client-ca"),
        help="mTLS: require client certificates issued by this CA (PEM)",
    )
    run.add_argument(
        "--grant-header",
        default=_env("grant-header"),
        help="take the grant id from this header (set by Envoy after verifying the caller)",
    )
    run.add_argument(
        "--fail-open",
        action="store_true",
        default=_env_flag("fail-open"),
        help="allow calls that need a counter when the store is down (default: deny, 503)",
    )
    run.add_argument(
        "--store-timeout-ms",
        type=int,
        default=int(_env("store-timeout-ms", "50") or 50),
        help="bound on every store call (default 50)",
    )
    run.add_argument(
        "--drain-seconds",
        type=float,
        default=float(_env("drain-seconds", "0") or 0),
        help="on SIGTERM, keep answering this long after reporting NOT_SERVING",
    )
    run.add_argument(
        "--reload-interval",
        type=float,
        default=float(_env("reload-interval", "1") or 1),
        help="re-read the policy file this often, in seconds, and reload it when it changed "
        "(default 1; 0: only on SIGHUP)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=int(_env("workers", "1") or 1),
        help="serving processes sharing the ports (SO_REUSEPORT) under a supervising parent "
        "that restarts them (default 1: this process serves); more than 1 needs --redis",
    )
    run.add_argument(
        "--admin-tokens-file",
        default=_env("admin-tokens-file"),
        help="enable approvals and the admin API: a file of 'name:token' lines (the name is "
        "recorded as the operator); or set MCP_AUTHZ_ADMIN_TOKENS to the same entries",
    )
    run.add_argument(
        "--approval-webhook",
        default=_env("approval-webhook", ""),
        help="POST a notice (never argument values) here when an approval request opens",
    )
    run.set_defaults(reuse_port=False)
    run.add_argument(
        "--log-level", default=_env("log-level", "INFO"), help="operational logs (stderr)"
    )
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=_env("log-format", "json"),
        help="operational logs as JSON lines (default) or text",
    )
    run.add_argument(
        "--audit-level",
        choices=list(AUDIT_LEVELS),
        default=_env("audit-level", "info"),
        help="audit lines on stdout: info, every decision (default); warning, denials only",
    )

    check = sub.add_parser(
        "check-policy",
        help="validate a policy file and show its rules; with --against, resolve the tools "
        "a live MCP server lists",
    )
    check.add_argument("path")
    check.add_argument("--against", metavar="URL", help="a live MCP server (streamable HTTP)")
    check.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="K:V",
        help="HTTP header for --against (e.g. 'Authorization: Bearer ...'); repeatable",
    )

    explain = sub.add_parser(
        "explain", help="the decision for one request body, and why; consumes no budget"
    )
    explain.add_argument("--policy", required=True)
    explain.add_argument("--grant", help="decide as this grant id (default: from the headers)")
    explain.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="K:V",
        help="request header (e.g. 'Mcp-Session-Id: abc'); repeatable",
    )
    explain.add_argument("body", help="the JSON-RPC body, or - to read it from stdin")

    test = sub.add_parser("test", help="run a policy's unit tests (a YAML or JSON cases file)")
    test.add_argument("policy")
    test.add_argument("cases")

    approvals = sub.add_parser("approvals", help="list, show, approve or reject approvals")
    approvals.add_argument(
        "--url",
        default=_env("admin-url", "http://127.0.0.1:9002"),
        help="mcp-authz's --http address (default http://127.0.0.1:9002)",
    )
    approvals.add_argument(
        "--token-file", default=_env("admin-token-file"), help="file holding your admin token"
    )
    verbs = approvals.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="pending and recent approvals")
    for verb in ("show", "approve", "reject"):
        cmd = verbs.add_parser(verb)
        cmd.add_argument("id")
        if verb == "reject":
            cmd.add_argument("--reason", default="", help="told to the agent")
    return parser


def _approvals(args: argparse.Namespace) -> int:
    """The operator's side of approvals, through the admin API of a running mcp-authz."""
    token = (
        Path(args.token_file).read_text(encoding="utf-8").strip()
        if args.token_file
        else _env("admin-token", "")
    )
    if not token:
        print(
            "mcp-authz approvals: --token-file or MCP_AUTHZ_ADMIN_TOKEN is required",
            file=sys.stderr,
        )
        return 2
    if args.verb == "list":
        status, body = admin.admin_request(args.url, token, "GET", "/approvals")
    elif args.verb == "show":
        status, body = admin.admin_request(args.url, token, "GET", f"/approvals/{args.id}")
    else:
        payload = {"reason": args.reason} if args.verb == "reject" else {}
        path = f"/approvals/{args.id}/{args.verb}"
        status, body = admin.admin_request(args.url, token, "POST", path, payload)
    if status >= 300:
        print(f"mcp-authz approvals: {status}: {body.get('error', body)}", file=sys.stderr)
        return 1
    if args.verb == "list":
        for item in body["approvals"]:
            names = ",".join(item["argument_names"])
            print(
                f"{item['id']}  {item['state']:<9} {item['tool']}  grant={item['grant']}  "
                f"args=[{names}] sha256={item['arguments_sha256'][:12]}  "
                f"expires={time.strftime('%H:%M:%S', time.localtime(item['expires_at']))}"
            )
        return 0
    print(json.dumps(body, indent=2))
    return 0


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def _grpc_tls(args: argparse.Namespace) -> TlsFiles | str | None:
    """The gRPC listener's TLS files, checked to load; or the error text."""
    if not (args.grpc_tls_cert or args.grpc_tls_key or args.grpc_tls_client_ca):
        return None
    if not (args.grpc_tls_cert and args.grpc_tls_key):
        return "--grpc-tls-cert and --grpc-tls-key go together (--grpc-tls-client-ca needs both)"
    files = TlsFiles(
        cert=Path(args.grpc_tls_cert),
        key=Path(args.grpc_tls_key),
        client_ca=Path(args.grpc_tls_client_ca) if args.grpc_tls_client_ca else None,
    )
    try:
        tls.load(files)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"gRPC TLS files do not load: {exc}"
    return files


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (10-20% more checks per CPU-second in bench/), else
    asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format, args.audit_level)
    if not args.policy:
        print("mcp-authz serve: --policy (or MCP_AUTHZ_POLICY) is required", file=sys.stderr)
        return 2
    if args.redis and args.store == "memory":
        print("mcp-authz serve: choose --redis URL or --store memory, not both", file=sys.stderr)
        return 2
    if not args.redis and args.store != "memory":
        print(
            "mcp-authz serve: a counter store is required: --redis URL or --store memory",
            file=sys.stderr,
        )
        return 2
    if args.workers < 1 or (args.workers > 1 and not args.redis):
        print(
            "mcp-authz serve: --workers must be 1, or more with --redis (with the memory "
            "store every worker would keep its own counters)",
            file=sys.stderr,
        )
        return 2
    if args.grpc in ("", "off") and not args.authz_http:
        print("mcp-authz serve: --grpc off needs --authz-http HOST:PORT", file=sys.stderr)
        return 2
    grpc_tls = _grpc_tls(args)
    if isinstance(grpc_tls, str):
        print(f"mcp-authz serve: {grpc_tls}", file=sys.stderr)
        return 2
    try:
        admin_tokens = admin.load_tokens(args.admin_tokens_file, _env("admin-tokens"))
    except (OSError, ValueError) as exc:
        print(f"mcp-authz serve: admin tokens: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics(approvals=bool(admin_tokens))
    try:
        counters = open_store(args.redis or "memory://", timeout_s=args.store_timeout_ms / 1000)
        book = open_book(args.redis or "memory://") if admin_tokens else None
    except ValueError as exc:
        print(f"mcp-authz serve: --redis: {exc}", file=sys.stderr)
        return 2
    store = InstrumentedStore(counters, metrics)
    try:
        policy = load_policy(args.policy)
        engine = Engine(
            policy,
            store,
            grant_header=args.grant_header,
            fail_open=args.fail_open,
            approvals=book,
            approval_events=admin.approval_events(args.approval_webhook),
        )
    except PolicyError as exc:
        print(f"{args.policy}: invalid policy, refusing to start", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    if args.workers > 1:
        # The policy is valid; each worker runs this function again as a single process
        # on the shared ports, loading the policy through the same path.
        worker = argparse.Namespace(**{**vars(args), "workers": 1, "reuse_port": True})
        return supervise(args.workers, functools.partial(_serve, worker))
    for warning in policy.warnings:
        logging.getLogger("mcp_authz").warning("policy warning: %s", warning)
    settings = Settings(
        grpc_address=args.grpc,
        authz_http_address=args.authz_http,
        http_address=args.http,
        drain_seconds=args.drain_seconds,
        policy_path=args.policy,
        reload_interval_s=args.reload_interval,
        reuse_port=args.reuse_port,
        grpc_tls=grpc_tls,
        admin_tokens=admin_tokens,
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(engine, settings, metrics))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-policy":
        return tooling.check_policy(args.path, args.against, dict(args.header))
    if args.command == "explain":
        body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
        return tooling.explain(args.policy, body, args.grant, dict(args.header))
    if args.command == "test":
        return tooling.run_cases(args.policy, args.cases)
    if args.command == "approvals":
        return _approvals(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
