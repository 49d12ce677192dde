"""The ``mcp-authz`` command: ``serve``, and ``check-policy``, ``explain`` and ``test`` for
policy authors (see :mod:`authz.tooling`).

``serve`` reads its flags and ``MCP_AUTHZ_*`` variables into one :class:`Settings`
(:mod:`authz.settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from authz import admin_client, notify, settings
from authz.audit import configure_logging
from authz.catalogue import Catalogue
from authz.engine import Engine
from authz.metrics import Metrics
from authz.policy import Policy, PolicyError, load_policy
from authz.server import serve
from authz.settings import ENV_PREFIX, Settings
from authz.store import open_store
from authz.store.instrumented import InstrumentedStore
from authz.tooling import cases, explain, report
from authz.workers import supervise


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-authz", description="Policy-enforcing Envoy ext_authz service for MCP servers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "serve",
        help="run the ext_authz service (gRPC, Envoy's HTTP mode, or both)",
        description="Run the ext_authz service over gRPC (with the list filter), Envoy's "
        "HTTP mode (--authz-http), or both. Every flag can also be set as "
        "MCP_AUTHZ_<FLAG> (--grant-header: MCP_AUTHZ_GRANT_HEADER); a flag given wins.",
    )
    settings.add_arguments(run)

    check = sub.add_parser(
        "check-policy",
        help="validate a policy file and show its rules; with --against, resolve the tools "
        "a live MCP server lists",
    )
    check.add_argument("path")
    check.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="URL|NAME=URL",
        help="a live MCP server (streamable HTTP); for a policy with servers, NAME=URL per "
        "server (repeatable), which prints the estate: every tool of every server, its rule "
        "and the budgets it spends",
    )
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
        "--claims",
        type=_claims,
        metavar="JSON",
        help='the caller\'s verified JWT claims, e.g. \'{"sub": "a", "scope": "ecs:write"}\'',
    )
    explain.add_argument("--principal", default="", help="the caller's mTLS principal")
    explain.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="K:V",
        help="request header (e.g. 'Mcp-Session-Id: abc'); repeatable",
    )
    explain.add_argument(
        "--server", default="", help="the MCP server the request is for (a policy with servers)"
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
        status, body = admin_client.admin_request(args.url, token, "GET", "/approvals")
    elif args.verb == "show":
        status, body = admin_client.admin_request(args.url, token, "GET", f"/approvals/{args.id}")
    else:
        payload = {"reason": args.reason} if args.verb == "reject" else {}
        path = f"/approvals/{args.id}/{args.verb}"
        status, body = admin_client.admin_request(args.url, token, "POST", path, payload)
    if status == 404 and body == {"error": "404: Not Found"}:  # no admin API mounted
        print(
            "mcp-authz approvals: approvals are not enabled on this server "
            "(no admin tokens configured)",
            file=sys.stderr,
        )
        return 1
    if status >= 300:
        print(f"mcp-authz approvals: {status}: {body.get('error', body)}", file=sys.stderr)
        return 1
    if args.verb == "list":
        if not body["approvals"]:
            print("no approvals: none pending, none decided recently")
        for item in body["approvals"]:
            names = ",".join(item["argument_names"])
            server = f"{item['server']}/" if item.get("server") else ""
            caller = f"caller={item['caller']}  " if item.get("caller") else ""
            print(
                f"{item['id']}  {item['state']:<9} {server}{item['tool']}  {caller}"
                f"grant={item['grant']}  "
                f"args=[{names}] sha256={item['arguments_sha256'][:12]}  "
                f"expires={time.strftime('%H:%M:%S', time.localtime(item['expires_at']))}"
            )
        return 0
    print(json.dumps(body, indent=2))
    return 0


def _claims(text: str) -> dict[str, object]:
    try:
        claims = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(claims, dict):
        raise argparse.ArgumentTypeError("claims must be a JSON object")
    return claims


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (10-20% more checks per CPU-second in bench/), else
    asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _serve(args: argparse.Namespace) -> int:
    try:
        config = settings.from_arguments(vars(args), os.environ)
    except settings.SettingsError as exc:
        print(f"mcp-authz serve: {exc}", file=sys.stderr)
        return 2
    if config.workers == 1:
        return _serve_process(config)
    # The parent serves nothing: it loads the policy only to refuse a bad one at once,
    # instead of in every worker; each worker builds its own engine, store and metrics.
    configure_logging(config.log_level, config.log_format, config.audit_level)
    if _load(config) is None:
        return 1
    return supervise(
        config.workers, functools.partial(_serve_process, config), config.drain_seconds
    )


def _load(config: Settings) -> Policy | None:
    try:
        policy = load_policy(config.policy_path)
    except PolicyError as exc:
        print(f"{config.policy_path}: invalid policy, refusing to start", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None
    if config.upstream_url and policy.servers is not None:
        # One URL cannot stand for several servers' lists; each server's catalogue is
        # learnt from its own list responses instead.
        print(
            f"{config.policy_path}: a policy with servers learns each server's tools from "
            "its own lists; --upstream-url (MCP_AUTHZ_UPSTREAM_URL) names one upstream, "
            "remove it",
            file=sys.stderr,
        )
        return None
    return policy


def _serve_process(config: Settings) -> int:
    """One serving process: the only one, or a worker (which runs this in a fresh
    interpreter, loading the policy through the same path)."""
    configure_logging(config.log_level, config.log_format, config.audit_level)
    policy = _load(config)
    if policy is None:
        return 1
    metrics = Metrics(approvals=bool(config.admin_tokens))
    try:
        counters = open_store(config.store_url, timeout_s=config.store_timeout_s)
        book = counters.approval_book() if config.admin_tokens else None
    except ValueError as exc:
        print(f"mcp-authz serve: --redis: {exc}", file=sys.stderr)
        return 2
    engine = Engine(
        policy,
        InstrumentedStore(counters, metrics.store_duration, metrics.store_errors),
        grant_header=config.grant_header,
        fail_open=config.fail_open,
        approvals=book,
        approval_events=notify.approval_events(config.approval_webhook),
        catalogue=Catalogue(awaited=bool(config.upstream_url)),
    )
    for warning in policy.warnings:
        logging.getLogger("mcp_authz").warning("policy warning: %s", warning)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(engine, config, metrics))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-policy":
        return report.check_policy(args.path, args.against, dict(args.header))
    if args.command == "explain":
        body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
        return explain.explain(
            args.policy,
            body,
            args.grant,
            dict(args.header),
            claims=args.claims,
            principal=args.principal,
            server=args.server,
        )
    if args.command == "test":
        return cases.run_cases(args.policy, args.cases)
    if args.command == "approvals":
        return _approvals(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
