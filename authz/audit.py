"""The audit trail: one JSON line per decision on stdout, and the service's own logs.

An audit line says who (grant, and the caller set it was recognised as), what (MCP
method, tool, SHA-256 of the arguments, and the ``server`` under a policy with servers),
what was decided and why (decision, reason code and text, the policy entry), what it cost
(counters touched and the budget left) and how long it took; ``request_id`` is Envoy's
``x-request-id``, which Envoy's access log prints too, so a denial can be followed from
one log to the other. It never carries argument values, bodies, headers or tokens: the
traffic carries PHI (DICOM exports). The one exception is a policy rule with
``"log_arguments": true``, an operator's explicit choice for a tool whose arguments are
known to be harmless.

The decision is ``allow``, ``deny`` or ``dry_run_deny`` (allowed, but a rule in dry-run
mode would have denied, with that reason). Allowed calls are audited at INFO, the others at
WARNING, so ``--audit-level warning`` keeps only the (would-be) denials.

Decision lines are written to stdout directly rather than through ``logging``, whose
per-record machinery (caller lookup, record object, handler lock) would weigh on every
check. Rarer audit events (approvals, :func:`approval_event`) go through the
``mcp_authz.audit`` logger, which writes its messages verbatim to the same stdout at the
same level. The service's operational logs go to stderr through ``logging``, as JSON or
text.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from typing import Any, TextIO

import orjson

from authz import denials
from authz.approvals import Approval
from authz.decision import CheckResult
from authz.listing import ListFiltered
from authz.policy import Policy

AUDIT_LOGGER = "mcp_authz.audit"
LOG_FORMATS = ("json", "text")
AUDIT_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}

log = logging.getLogger("mcp_authz")


class _Sink:
    """Where audit lines go and from which level; nowhere until logging is configured."""

    stream: TextIO | None = None
    level = logging.INFO


_sink = _Sink()


class JsonFormatter(logging.Formatter):
    """Operational log records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return json.dumps(entry, separators=(",", ":"))


# ".000Z" to ".999Z": a timestamp's milliseconds, formatted once rather than once a line.
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _iso_time(seconds: float) -> str:
    return _whole_second(int(seconds)) + _MILLISECONDS[int(seconds * 1000) % 1000]


@functools.lru_cache(maxsize=2)
def _whole_second(seconds: int) -> str:
    """strftime once a second rather than once a line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def configure_logging(level: str, fmt: str, audit_level: str) -> None:
    """Operational logs to stderr at ``level`` in ``fmt``; audit lines to stdout."""
    errors = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        errors.setFormatter(JsonFormatter())
    else:
        errors.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [errors]
    root.setLevel(level.upper())
    _sink.stream = sys.stdout
    _sink.level = AUDIT_LEVELS[audit_level]
    events = logging.StreamHandler(sys.stdout)
    events.setFormatter(logging.Formatter("%(message)s"))
    audit_logger = logging.getLogger(AUDIT_LOGGER)
    audit_logger.handlers[:] = [events]
    audit_logger.propagate = False
    audit_logger.setLevel(_sink.level)


def _json_line(line: dict[str, Any]) -> str:
    try:
        # orjson rather than json.dumps: this runs once per check.
        return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE).decode()
    except TypeError:  # logged arguments with integers beyond 64 bits or lone surrogates
        return json.dumps(line, separators=(",", ":")) + "\n"


def record(result: CheckResult, request_id: str, latency_s: float) -> None:
    """Write the audit line of one check (nothing, cheaply, when its level is off)."""
    decision = result.decision
    verdict, reason = decision.labels
    level = logging.INFO if verdict == "allow" else logging.WARNING
    if _sink.stream is None or level < _sink.level:
        return
    line: dict[str, Any] = {
        "time": _iso_time(time.time()),
        "request_id": request_id,
        "grant": decision.grant,
        "caller": decision.caller,
        "method": decision.method,
        "tool": decision.tool,
        "decision": verdict,
        "reason": reason,
        "reason_text": decision.message or None,
        "rule": decision.rule,
        "counters": [
            {"counter": c.counter, "remaining": c.remaining, "max": c.max} for c in result.counters
        ],
        "arguments_sha256": decision.arguments_sha256,
        "latency_ms": round(latency_s * 1000, 3),
        "policy": result.policy.digest[:12],
    }
    if decision.server is not None:
        line["server"] = decision.server
    if decision.retry_after_s is not None:
        line["retry_after_s"] = decision.retry_after_s
    if decision.element is not None:
        line["batch_element"] = decision.element
    if decision.fail_open:
        line["fail_open"] = True
    if decision.log_arguments:
        call = result.logged_call()
        line["arguments"] = call.arguments if call is not None else None
    if verdict != "allow":
        denials.recent.add(line)
    _write(line)


def record_list(request_id: str, grant: str | None, listed: ListFiltered, policy: Policy) -> None:
    """The audit line of one filtered list result: how many entries were kept and hidden,
    and the hidden tool or prompt names (never resource URIs, schemas or descriptions)."""
    if _sink.stream is None or _sink.level > logging.INFO:
        return
    _write(
        {
            "time": _iso_time(time.time()),
            "request_id": request_id,
            "grant": grant,
            "method": listed.method,
            "decision": "list_filtered",
            "kept": listed.kept,
            "hidden": listed.hidden,
            "hidden_names": list(listed.hidden_names),
            "policy": policy.digest[:12],
            **({"server": policy.server} if policy.server else {}),
        }
    )


def record_list_failure(
    request_id: str, grant: str | None, methods: tuple[str, ...], why: str
) -> None:
    """The audit line of a list response replaced by an error because it could not be
    filtered (fail closed)."""
    if _sink.stream is None or _sink.level > logging.WARNING:
        return
    _write(
        {
            "time": _iso_time(time.time()),
            "request_id": request_id,
            "grant": grant,
            "method": ",".join(methods),
            "decision": "list_failed",
            "reason": "list_unfilterable",
            "reason_text": why,
        }
    )


def _write(line: dict[str, Any]) -> None:
    assert _sink.stream is not None
    try:
        _sink.stream.write(_json_line(line))
        _sink.stream.flush()
    except (OSError, ValueError) as exc:  # a closed or broken stdout must not fail checks
        log.error("audit line not written: %s", type(exc).__name__)


def approval_event(event: str, approval: Approval, operator: str = "") -> None:
    """The audit line of an approval event (``requested``, ``approved``, ``rejected``,
    ``consumed``, ``expired``); argument values never exist here."""
    line = {
        "time": _iso_time(time.time()),
        "event": f"approval_{event}",
        "approval_id": approval.id,
        "grant": approval.grant,
        "tool": approval.tool,
        "arguments_sha256": approval.arguments_sha256,
        "operator": operator or approval.operator or None,
    }
    logging.getLogger(AUDIT_LOGGER).info("%s", json.dumps(line, separators=(",", ":")))
