"""One check, whatever the transport: decide, count, audit, and the reply to encode.

The gRPC servicer (``server.py``) and the HTTP ext_authz protocol (``authz_http.py``) each
turn their wire request into an :class:`authz.mcp.HttpRequest` and call :func:`answer`; the
decision, the metrics and the audit line cannot differ between them. A check never raises
out of here: anything unexpected becomes a 503 denial (fail closed), logged without the
request's body, arguments or credentials.
"""

from __future__ import annotations

import logging
import time

from authz import audit, reply
from authz.engine import Decision, Engine, Reason
from authz.mcp import HttpRequest
from authz.metrics import Metrics

log = logging.getLogger("mcp_authz")


async def answer(engine: Engine, metrics: Metrics, http: HttpRequest) -> reply.Reply:
    """Decide ``http``, count and audit the decision, and return its reply."""
    started = time.perf_counter()
    # The engine reads the policy once at its start, synchronously, so this is the
    # policy the decision was made under even if a reload swaps it meanwhile.
    policy = engine.policy
    try:
        decision = await engine.check(http)
    except Exception as exc:  # a bug must deny, never allow or crash
        log.error("check failed: %s", type(exc).__name__)
        decision = Decision(
            reason=Reason.INTERNAL_ERROR,
            message="policy violation: internal error in the authorization service",
        )
    result = reply.of(decision, http.headers)
    latency = time.perf_counter() - started
    metrics.record_check(decision, latency, policy)
    audit.record(decision, http.request_id, http.body, latency, policy)
    return result
