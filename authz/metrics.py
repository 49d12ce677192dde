"""Prometheus metrics of the authorization service, served at ``/metrics`` on the HTTP port.

Every label value comes from a small, fixed set so a scrape stays small however much
traffic passes: ``decision`` and ``reason`` are the codes of
:attr:`authz.decision.Decision.labels`; ``tool`` is a tool the policy names, ``other`` for
any other tool, or empty for a request that calls no tool (listing, lifecycle, malformed);
``caller`` is a caller set the policy names, or ``other`` for a caller in none (and under
a policy without caller sets); ``counter`` is a counter the policy defines; ``server`` is a
server a policy with servers defines, ``other`` for a check refused as unknown_server,
empty under a policy without servers; ``op`` and ``result`` are fixed words. Grant
ids, argument values and request ids never become labels.

``mcp_authz_approvals_pending`` is exported only when approvals are enabled (an admin token
is configured): otherwise a gauge that always says 0 would tell the operator something false.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from authz.decision import CheckResult, Reason
from authz.listing import KINDS
from authz.policy import Policy
from authz.policy.callers import OTHER

# From a check answered in memory to one waiting on Redis, and past Envoy's 250 ms
# ext_authz timeout: 100 us to 1 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

# A call that leaves less than this fraction of a counter's budget counts as "near".
NEAR_LIMIT_FRACTION = 0.2

RELOAD_RESULTS = ("success", "failure")
LIST_RESULTS = ("filtered", "failed")
STORE_OPS = ("acquire", "ping", "record", "lookup")

# The *_created series double the series count of every counter and histogram and no
# dashboard or alert here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def tool_label(tool: str | None, policy: Policy) -> str:
    """The tool as a label: named tools as themselves, any other as ``other``."""
    if tool is None:
        return ""
    return tool if tool in policy.tools else "other"


def list_server_label(policy: Policy, server: str) -> str:
    """The server of a list as a label, under ``policy`` (the policy in force): a server it
    defines, ``other`` for any other name, empty under a policy without servers."""
    if policy.servers is None:
        return ""
    return server if server in policy.servers else OTHER


def server_label(result: CheckResult) -> str:
    """The server as a label: a server the policy defines (the check was decided by its
    policy), ``other`` for one it does not, empty under a policy without servers."""
    if result.policy.server:
        return result.policy.server
    return "" if result.decision.server is None else OTHER


class Metrics:
    """The service's metrics in their own registry, with the process, platform and garbage
    collector collectors of the client library (so tests can build as many as they like).
    """

    def __init__(self, approvals: bool = False) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        reg = self.registry
        self.decisions = Counter(
            "mcp_authz_decisions_total",
            "Authorization decisions, by decision (allow, deny, dry_run_deny: allowed, but a "
            "rule in dry-run mode would have denied), reason code, tool (tools the policy "
            "names; 'other' for the rest; empty when no tool is called), caller (the caller "
            "set the policy recognised; 'other' for a caller in none) and server (servers the "
            "policy defines; 'other' for the rest; empty for a policy without servers).",
            ["decision", "reason", "tool", "caller", "server"],
            registry=reg,
        )
        self.check_duration = Histogram(
            "mcp_authz_check_duration_seconds",
            "Time to answer one ext_authz Check, from request to response, store included.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        store_duration = Histogram(
            "mcp_authz_store_duration_seconds",
            "Time of one counter store call (acquire: a check's spend; ping: readiness; "
            "record: a session or task id written or dropped; lookup: task ids looked up).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        store_errors = Counter(
            "mcp_authz_store_errors_total",
            "Counter store calls that failed or timed out; checks that needed a counter were "
            "denied with store_unavailable unless --fail-open.",
            ["op"],
            registry=reg,
        )
        self.store_duration = {op: store_duration.labels(op) for op in STORE_OPS}
        self.store_errors = {op: store_errors.labels(op) for op in STORE_OPS}
        self.limit_near = Counter(
            "mcp_authz_limit_near_total",
            f"Allowed calls that left less than {NEAR_LIMIT_FRACTION:.0%} of a counter's "
            "budget in its window, by counter and server.",
            ["counter", "server"],
            registry=reg,
        )
        self.limit_exceeded = Counter(
            "mcp_authz_limit_exceeded_total",
            "Calls denied because a counter's budget was spent (rate_limited), by counter and "
            "server.",
            ["counter", "server"],
            registry=reg,
        )
        reloads = Counter(
            "mcp_authz_policy_reloads_total",
            "Policy file reloads, by result (success, failure: the previous policy stays).",
            ["result"],
            registry=reg,
        )
        self.policy_reloads = {result: reloads.labels(result) for result in RELOAD_RESULTS}
        self.policy_info = Info(
            "mcp_authz_policy",
            "The policy in force: SHA-256 digest of the file and its format version.",
            registry=reg,
        )
        self.policy_loaded_at = Gauge(
            "mcp_authz_policy_last_reload_success_timestamp_seconds",
            "Unix time the policy in force was loaded (at start or by the last good reload).",
            registry=reg,
            multiprocess_mode="livemin",  # --workers: the worker with the oldest policy
        )
        self.ready = Gauge(
            "mcp_authz_ready",
            "1 when this replica answers /readyz with 200 (policy loaded, store reachable, "
            "not draining), else 0; evaluated at each scrape.",
            registry=reg,
            multiprocess_mode="livemostrecent",  # --workers: the worker that was scraped
        )
        self.approvals_pending = (
            Gauge(
                "mcp_authz_approvals_pending",
                "Approval requests waiting for an operator (shared by every replica).",
                registry=reg,
                multiprocess_mode="livemostrecent",
            )
            if approvals
            else None
        )
        list_responses = Counter(
            "mcp_authz_list_responses_total",
            "List results through the list filter (ext_proc), by kind (tools, prompts, "
            "resources, resource_templates), result (filtered; failed: replaced by a "
            "JSON-RPC error because it could not be filtered) and server (as for checks).",
            ["kind", "result", "server"],
            registry=reg,
        )
        list_hidden = Counter(
            "mcp_authz_list_entries_hidden_total",
            "Entries removed from list results because the caller may not use them, by kind "
            "and server.",
            ["kind", "server"],
            registry=reg,
        )
        self.list_responses = list_responses
        self.list_hidden = list_hidden
        # Under a policy without servers the server label is empty: those series exist
        # from the start, at zero, as they did before the label.
        for kind in KINDS:
            for result in LIST_RESULTS:
                list_responses.labels(kind, result, "")
            list_hidden.labels(kind, "")
        self._decision_children: dict[tuple[str, str, str, str, str], Counter] = {}
        self._near_children: dict[tuple[str, str], Counter] = {}
        self._exceeded_children: dict[tuple[str, str], Counter] = {}

    def record_check(self, result: CheckResult, seconds: float) -> None:
        """Count one answered check under the policy it was decided by."""
        decision = result.decision
        server = server_label(result)
        key = (
            *decision.labels,
            tool_label(decision.tool, result.policy),
            decision.caller or OTHER,
            server,
        )
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()
        self.check_duration.observe(seconds)
        if decision.allowed and decision.would_deny is None:
            for state in result.counters:
                if state.remaining < NEAR_LIMIT_FRACTION * state.max:
                    labels = (state.counter, server)
                    self._child(self._near_children, self.limit_near, labels).inc()
        elif decision.reason is Reason.RATE_LIMITED and decision.counter is not None:
            labels = (decision.counter, server)
            self._child(self._exceeded_children, self.limit_exceeded, labels).inc()

    @staticmethod
    def _child(
        children: dict[tuple[str, str], Counter], parent: Counter, labels: tuple[str, str]
    ) -> Counter:
        child = children.get(labels)
        if child is None:
            child = children[labels] = parent.labels(*labels)
        return child

    def record_list(self, kind: str, result: str, server: str, hidden: int = 0) -> None:
        """Count one list result the list filter handled, and the entries it hid.
        ``server``: :func:`list_server_label`."""
        self.list_responses.labels(kind, result, server).inc()
        if hidden:
            self.list_hidden.labels(kind, server).inc(hidden)

    def policy_loaded(self, policy: Policy) -> None:
        """The policy in force changed (at start, or a reload succeeded)."""
        self.policy_info.info({"digest": policy.digest, "version": policy.version})
        self.policy_loaded_at.set(time.time())

    def policy_reloaded(self, result: str, policy: Policy | None) -> None:
        """Callback for the policy file watcher: ``result`` is "success" or "failure"."""
        self.policy_reloads[result].inc()
        if result == "success" and policy is not None:
            self.policy_loaded(policy)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the scraper asked for."""
        encoder, content_type = choose_encoder(accept)
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            # --workers N: every worker writes its samples to files in that directory (set
            # by the supervisor before the workers start); whichever worker is scraped adds
            # them all up. Process collectors would describe one worker only, so they are
            # left out; the policy info is this worker's.
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self.policy_info)
            return encoder(registry), content_type
        return encoder(self.registry), content_type
