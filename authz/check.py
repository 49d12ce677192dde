"""One check, whatever the transport: decide, count, audit, and the reply to encode.

The gRPC servicer (``server.py``) and the HTTP ext_authz protocol (``authz_http.py``) each
turn their wire request into an :class:`authz.mcp.HttpRequest` and call :func:`answer`; the
decision, the metrics and the audit line cannot differ between them. The engine never
raises (a bug becomes a 503 denial, fail closed), so neither does this.
"""

from __future__ import annotations

import time

from authz import audit, reply
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.metrics import Metrics


async def answer(engine: Engine, metrics: Metrics, http: HttpRequest) -> reply.Reply:
    """Decide ``http``, count and audit the decision, and return its reply."""
    started = time.perf_counter()
    result = await engine.check(http)
    answered = reply.of(result.decision, http.headers)
    latency = time.perf_counter() - started
    metrics.record_check(result, latency)
    audit.record(result, http.request_id, latency)
    return answered
