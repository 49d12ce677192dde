"""Wiring and lifecycle: the gRPC ext_authz service, health, and the HTTP side port.

A check never raises out of here: anything unexpected becomes a 503 denial (fail closed),
logged without the request's body, arguments or credentials.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz import envoy
from authz.engine import Decision, Engine, Reason
from authz.pb import external_auth_pb2, external_auth_pb2_grpc
from authz.store import StoreUnavailable

log = logging.getLogger("mcp_authz")
audit = logging.getLogger("mcp_authz.audit")

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


@dataclass(frozen=True)
class Settings:
    grpc_address: str = "127.0.0.1:9001"
    http_address: str = "127.0.0.1:9002"
    drain_seconds: float = 0.0


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """envoy.service.auth.v3.Authorization/Check."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        http = envoy.http_request(request)
        try:
            decision = await self.engine.check(http)
        except Exception as exc:  # a bug must deny, never allow or crash
            log.error("check failed: %s", type(exc).__name__)
            decision = Decision(
                reason=Reason.INTERNAL_ERROR,
                message="policy violation: internal error in the authorization service",
            )
        audit.info(
            "%s",
            json.dumps(
                {
                    "request_id": http.request_id,
                    "grant": decision.grant,
                    "tool": decision.tool,
                    "decision": "allow" if decision.allowed else "deny",
                    "reason": decision.reason.code,
                    "rule": decision.rule,
                    "counter": decision.counter,
                    "fail_open": decision.fail_open or None,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                },
                separators=(",", ":"),
            ),
        )
        return envoy.check_response(decision, http.headers)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (operator's choice)


async def _http_app(engine: Engine) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        try:
            await engine.store.ping()
        except StoreUnavailable:
            return web.Response(status=503, text="store unavailable\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(engine: Engine, settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then report NOT_SERVING, drain and stop."""
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationService(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(settings.grpc_address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC address {settings.grpc_address}")
    await server.start()
    for service in ("", AUTHZ_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    runner = web.AppRunner(await _http_app(engine), access_log=None)
    await runner.setup()
    host, port = _split(settings.http_address)
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info(
        "serving ext_authz on %s, health on http://%s/healthz (policy %s)",
        settings.grpc_address,
        settings.http_address,
        engine.policy.digest[:12],
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("stopping: draining for %.1f s", settings.drain_seconds)
    for service in ("", AUTHZ_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await asyncio.sleep(settings.drain_seconds)
    await server.stop(grace=5.0)
    await runner.cleanup()
    await engine.store.close()
    log.info("stopped")
