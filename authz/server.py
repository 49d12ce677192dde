"""Wiring and lifecycle: the ext_authz services (gRPC, and Envoy's HTTP mode), health, and
the HTTP side port.

A check never raises out of the engine: anything unexpected becomes a 503 denial (fail
closed), logged without the request's body, arguments or credentials. Every answered check
is counted in the metrics and written to the audit log from the engine's one result.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Mapping

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz import admin, authz_http, check, console, envoy, tls, upstream
from authz.engine import Engine
from authz.extproc import EXT_PROC_SERVICE, ListFilterService
from authz.metrics import Metrics
from authz.pb import external_auth_pb2, external_auth_pb2_grpc, external_processor_pb2_grpc
from authz.reload import watch_policy
from authz.settings import Settings
from authz.store import StoreUnavailable

log = logging.getLogger("mcp_authz")

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
# After the drain, checks still in flight get this long to finish before the server stops.
IN_FLIGHT_GRACE_S = 5.0


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """envoy.service.auth.v3.Authorization/Check: decide, count, audit, answer."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = envoy.http_request(request)
        return envoy.encode(await check.answer(self.engine, self.metrics, http))


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (operator's choice)


def _http_app(
    engine: Engine, metrics: Metrics, draining: asyncio.Event, admin_tokens: Mapping[str, str]
) -> web.Application:
    """/healthz: the process answers. /readyz: it should get traffic (a policy is loaded,
    which holds from start on; the store answers; not draining). /metrics: Prometheus.
    /admin/v1/: the approvals API, only when approvals and admin tokens are configured."""

    async def not_ready() -> str | None:
        if draining.is_set():
            return "draining"
        try:
            await engine.store.ping()
        except StoreUnavailable:
            return "store unavailable"
        return None

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        problem = await not_ready()
        if problem is not None:
            return web.Response(status=503, text=f"{problem}\n")
        return web.Response(text="ready\n")

    async def scrape(request: web.Request) -> web.Response:
        metrics.ready.set(0 if await not_ready() else 1)
        body, content_type = metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    if engine.approvals is not None and admin_tokens:
        app.add_subapp("/admin/v1", admin.admin_app(engine.approvals, admin_tokens))
        app.add_subapp(
            console.PATH,
            console.console_app(engine.approvals, admin_tokens, engine.approval_events),
        )
    return app


async def serve(engine: Engine, settings: Settings, metrics: Metrics) -> None:
    """Run until SIGTERM or SIGINT, then drain: report NOT_SERVING (gRPC health) and not
    ready (/readyz) while still answering every check for ``drain_seconds``, so Envoy and
    Kubernetes move traffic away first; then stop, letting checks in flight finish."""
    metrics.policy_loaded(engine.policy)
    draining = asyncio.Event()
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(settings.reuse_port))])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(engine, metrics), server
    )
    # The list filter (Envoy ext_proc) on the same port: Envoy calls it for list responses.
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ListFilterService(engine, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.grpc_address:
        bound = tls.bind(server, settings.grpc_address, settings.grpc_tls)
        if bound == 0:
            raise OSError(f"cannot bind gRPC address {settings.grpc_address}")
        await server.start()
    else:
        # Envoy's ext_proc speaks gRPC only: the shipped envoy-http.yaml then refuses list
        # requests (its list filter is unreachable: fail closed), and an Envoy without the
        # list filter passes list responses unfiltered.
        log.warning("--grpc off: no list filter is served (Envoy's ext_proc is gRPC only)")
    checks_over_http = None
    if settings.authz_http_address:
        followed = tls.FollowedContext(settings.grpc_tls) if settings.grpc_tls else None
        if followed is None:
            tls.warn_if_exposed(settings.authz_http_address)
        checks_over_http = authz_http.Listener(authz_http.checks(engine, metrics), followed)
        host, port = _split(settings.authz_http_address)
        await checks_over_http.start(host, port, reuse_port=settings.reuse_port)
    try:
        # Connect (and, for TLS, handshake) before the first check, which would otherwise
        # pay for it inside the store timeout and could be denied with 503.
        await engine.store.ping()
    except StoreUnavailable as exc:
        log.warning("counter store not reachable at start: %s", exc)
    # Everything built so far (policy, protobuf and gRPC machinery) lives as long as the
    # process: keep it out of the cyclic collector's scans, and collect the young
    # generation less often (checks create few reference cycles).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    for service in ("", AUTHZ_SERVICE, EXT_PROC_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    runner = web.AppRunner(
        _http_app(engine, metrics, draining, settings.admin_tokens), access_log=None
    )
    await runner.setup()
    host, port = _split(settings.http_address)
    site = web.TCPSite(runner, host, port, reuse_port=settings.reuse_port)
    await site.start()
    listeners = [f"{settings.grpc_address} (gRPC)"] if settings.grpc_address else []
    if settings.authz_http_address:
        listeners.append(f"{settings.authz_http_address} (HTTP)")
    log.info(
        "serving ext_authz on %s, health and metrics on http://%s (policy %s)",
        " and ".join(listeners),
        settings.http_address,
        engine.policy.digest[:12],
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if settings.policy_path:
        watcher = asyncio.create_task(
            watch_policy(
                settings.policy_path,
                engine,
                metrics.policy_reloaded,
                interval=settings.reload_interval_s,
                sighup=True,
            )
        )
    catalogue = None
    if settings.upstream_url:
        catalogue = asyncio.create_task(upstream.keep_catalogue(engine, settings.upstream_url))
    expiries = None
    if engine.approvals is not None:
        expiries = asyncio.create_task(
            admin.watch_expiries(engine.approvals, metrics.approvals_pending)
        )
    await stop.wait()
    for task in (watcher, expiries, catalogue):
        if task is not None:
            task.cancel()

    log.info("stopping: draining for %.1f s", settings.drain_seconds)
    draining.set()
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(settings.drain_seconds)
    await asyncio.gather(
        server.stop(grace=IN_FLIGHT_GRACE_S),
        checks_over_http.stop(IN_FLIGHT_GRACE_S) if checks_over_http else asyncio.sleep(0),
    )
    await runner.cleanup()
    await engine.store.close()  # the approvals too: they live on the store's connection
    log.info("stopped")
