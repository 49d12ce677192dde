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
import logging
import os
import sys
from collections.abc import Sequence

from authz import tooling
from authz.audit import AUDIT_LEVELS, LOG_FORMATS, configure_logging
from authz.engine import Engine
from authz.metrics import InstrumentedStore, Metrics
from authz.policy import PolicyError, load_policy
from authz.server import Settings, serve
from authz.store import open_store
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
        "--redis", default=_env("redis"), help="counter store URL: redis://, rediss://"
    )
    run.add_argument(
        "--store",
        choices=["redis", "memory"],
        default=_env("store"),
        help="'memory' keeps counters in this process (one replica only)",
    )
    run.add_argument("--grpc", default=_env("grpc", "127.0.0.1:9001"), help="gRPC HOST:PORT")
    run.add_argument("--http", default=_env("http", "127.0.0.1:9002"), help="health HOST:PORT")
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
    return parser


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


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
    metrics = Metrics()
    store = InstrumentedStore(
        open_store(args.redis or "memory://", timeout_s=args.store_timeout_ms / 1000), metrics
    )
    try:
        policy = load_policy(args.policy)
        engine = Engine(policy, store, grant_header=args.grant_header, fail_open=args.fail_open)
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
        http_address=args.http,
        drain_seconds=args.drain_seconds,
        policy_path=args.policy,
        reload_interval_s=args.reload_interval,
        reuse_port=args.reuse_port,
    )
    asyncio.run(serve(engine, settings, metrics))
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
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
