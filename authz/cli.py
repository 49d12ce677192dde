"""The ``mcp-authz`` command: ``serve`` and ``check-policy``.

Every ``serve`` flag can also come from an ``MCP_AUTHZ_<FLAG>`` environment variable
(``--grant-header`` is ``MCP_AUTHZ_GRANT_HEADER``), which is how the Kubernetes manifests
configure it; a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from authz.engine import Engine
from authz.policy import PolicyError, load_policy
from authz.server import Settings, serve
from authz.store import open_store

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
    run.add_argument("--log-level", default=_env("log-level", "INFO"))

    check = sub.add_parser("check-policy", help="validate a policy file")
    check.add_argument("path")
    return parser


def _check_policy(path: str) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(f"{path}: invalid policy", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    print(f"{path}: ok (version {policy.version}, digest {policy.digest[:12]})")
    print(f"  default: {policy.default.action.value}")
    for name, rule in sorted(policy.tools.items()):
        limits = ", ".join(
            f"{lim.counter} {lim.max}/{lim.window_ms // 1000}s per {lim.scope.value}"
            for lim in rule.limits
        )
        print(f"  tool {name}: {rule.action.value}" + (f" within {limits}" if limits else ""))
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
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
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"{args.policy}: invalid policy, refusing to start", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    store = open_store(args.redis or "memory://", timeout_s=args.store_timeout_ms / 1000)
    engine = Engine(policy, store, grant_header=args.grant_header, fail_open=args.fail_open)
    settings = Settings(
        grpc_address=args.grpc, http_address=args.http, drain_seconds=args.drain_seconds
    )
    asyncio.run(serve(engine, settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-policy":
        return _check_policy(args.path)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
