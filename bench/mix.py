"""The benchmark's inputs: the request mix and the policies, generated before any run.

Every request is pre-rendered as raw HTTP/1.1 bytes, so the load generator only picks the
next one and the measured cost is Envoy's and the authorization service's, not the
generator's. The mix is what an agent fleet sends: mostly ``tools/call`` with arguments
(bodies of 300 B to 4 KiB), spread over 1,000 grants (one bearer token each), with a few
``tools/list`` and notifications. Seeded, so every run sends the same bytes.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_POLICY = ROOT / "examples" / "policy.json"

GRANTS = 1_000
REQUESTS = 6_000
BODY_MIN = 300
BODY_MAX = 4_096
# Shares of the mix; the rest are tools/call.
LIST_SHARE = 0.04
NOTIFICATION_SHARE = 0.04
# The schema's largest max: limits that count every call but never deny in a 10 s run.
NEVER_DENYING_MAX = 1_000_000
# The id of every tools/list request: Envoy answers them all with one response
# (:func:`list_response`, bench/run.py), which is then the response to each, so the list
# filter reads and filters it as it would an MCP server's.
LIST_ID = 1
BIG_POLICY_TOOLS = 1_000
BIG_POLICY_PATTERNS = 50

# The reference policy's tools that an allowed call may name, with their arguments' shape.
# Tools with limits make the check spend against Redis; the others must not touch it.
_TOOL_ARGUMENTS: dict[str, dict[str, Any]] = {
    "start_dicom_export_job": {
        "datastoreId": "",
        "jobName": "",
        "dataAccessRoleArn": "arn:aws:iam::123456789012:role/HealthImagingExport",
        "outputS3Uri": "s3://imaging-exports/studies/",
    },
    "ecs_troubleshooting_tool": {
        "action": "fetch_task_logs",
        "parameters": {"app_name": "", "time_window": 3600, "filter_pattern": "ERROR"},
    },
    "ecs_resource_management": {
        "api_operation": "DescribeServices",
        "api_params": {"cluster": "", "services": []},
    },
    "containerize_app": {"app_path": "/workspace/", "port": 8080},
    "validate_ecs_express_mode_prerequisites": {"app_name": "", "region": "us-east-1"},
    "wait_for_service_ready": {"cluster": "", "service_name": "", "timeout_seconds": 300},
    "list_datastores": {"datastoreStatus": "ACTIVE", "maxResults": 50},
}
LIMITED_TOOLS = frozenset(
    {"start_dicom_export_job", "ecs_troubleshooting_tool", "ecs_resource_management"}
)


@dataclass(frozen=True)
class Request:
    """One request of the mix, with what the benchmark needs to know about it."""

    headers: tuple[tuple[str, str], ...]
    body: bytes
    method: str
    tool: str | None

    @property
    def needs_counter(self) -> bool:
        return self.tool in LIMITED_TOOLS

    @property
    def raw(self) -> bytes:
        """As sent on the wire by HTTP/1.1 (what the load generator replays)."""
        head = "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return f"{head}Content-Length: {len(self.body)}\r\n\r\n".encode() + self.body


def _token(rng: random.Random, grant: int) -> str:
    return f"bench-{grant:04d}-{rng.getrandbits(128):032x}"


def _padding_item(rng: random.Random, tool: str) -> Any:
    """One realistic list element, repeated to grow a call's arguments to its size."""
    if tool == "start_dicom_export_job":
        return "1.2.840.113619.2." + ".".join(str(rng.randrange(10**6)) for _ in range(5))
    if tool == "ecs_resource_management":
        return f"svc-{rng.getrandbits(48):012x}"
    return {"key": f"tag-{rng.randrange(1000)}", "value": f"{rng.getrandbits(64):016x}"}


def _arguments(rng: random.Random, tool: str, target: int, envelope: int) -> dict[str, Any]:
    args = copy.deepcopy(_TOOL_ARGUMENTS[tool])
    name = f"app-{rng.getrandbits(32):08x}"
    for holder in (args, args.get("parameters", {}), args.get("api_params", {})):
        for key, value in holder.items():
            if value == "":
                holder[key] = name
    if tool == "containerize_app":
        args["app_path"] += name
    items: list[Any] = []
    if tool == "ecs_resource_management":
        args["api_params"]["services"] = items
    else:
        args["studyInstanceUIDs" if tool == "start_dicom_export_job" else "tags"] = items

    def size() -> int:
        return envelope + len(json.dumps(args, separators=(",", ":")))

    while size() <= target:
        items.append(_padding_item(rng, tool))
    if len(items) > 1 and size() > BODY_MAX:
        items.pop()
    return args


def _body(rng: random.Random, kind: str, request_id: int, tool: str) -> dict[str, Any]:
    if kind == "list":
        return {"jsonrpc": "2.0", "id": LIST_ID, "method": "tools/list", "params": {}}
    if kind == "notification":
        method = rng.choice(["notifications/initialized", "notifications/cancelled"])
        params = {"requestId": request_id - 1} if method.endswith("cancelled") else {}
        return {"jsonrpc": "2.0", "method": method, "params": params}
    target = int(BODY_MIN * ((BODY_MAX - 100) / BODY_MIN) ** rng.random())  # log-uniform
    envelope = len(
        json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": tool}},
            separators=(",", ":"),
        )
    ) + len(',"arguments":')
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": _arguments(rng, tool, target, envelope)},
    }


def _headers(token: str, session: str) -> tuple[tuple[str, str], ...]:
    """What an MCP client over streamable HTTP sends with every POST."""
    return (
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("Authorization", f"Bearer {token}"),
        ("Mcp-Session-Id", session),
        ("Mcp-Protocol-Version", "2025-06-18"),
    )


def requests(seed: int = 8) -> list[Request]:
    """The request mix, in the order the load generator cycles through it."""
    rng = random.Random(seed)
    grants = [(_token(rng, g), f"{rng.getrandbits(128):032x}") for g in range(GRANTS)]
    tools = sorted(_TOOL_ARGUMENTS)
    out = []
    for n in range(REQUESTS):
        token, session = grants[n % GRANTS]
        draw = rng.random()
        kind = (
            "list"
            if draw < LIST_SHARE
            else "notification"
            if draw < LIST_SHARE + NOTIFICATION_SHARE
            else "call"
        )
        tool = rng.choice(tools) if kind == "call" else None
        doc = _body(rng, kind, n + 1, tool or "")
        body = json.dumps(doc, separators=(",", ":")).encode()
        out.append(Request(_headers(token, session), body, doc["method"], tool))
    return out


def write_wrk_input(reqs: list[Request], path: Path) -> None:
    """The file ``mix.lua`` reads: each request as ``<length>\\n<raw bytes>``."""
    with path.open("wb") as out:
        for req in reqs:
            out.write(b"%d\n" % len(req.raw))
            out.write(req.raw)


def list_response() -> bytes:
    """The answer to the mix's ``tools/list``: every tool of the reference policy, so the
    list filter keeps the allowed ones and removes the two it denies."""
    tools = [
        {"name": name, "description": f"{name} (benchmark)", "inputSchema": {"type": "object"}}
        for name in json.loads(REFERENCE_POLICY.read_text())["tools"]
    ]
    doc = {"jsonrpc": "2.0", "id": LIST_ID, "result": {"tools": tools}}
    return json.dumps(doc, separators=(",", ":")).encode()


def reference_policy() -> dict[str, Any]:
    """``examples/policy.json`` with every limit raised so that it counts but never denies."""
    policy: dict[str, Any] = json.loads(REFERENCE_POLICY.read_text())
    for rule in policy["tools"].values():
        for limit in rule.get("limits", ()):
            limit["max"] = NEVER_DENYING_MAX
    return policy


def big_policy() -> dict[str, Any]:
    """The reference policy plus 1,000 more tools of every kind (allow, deny, limited, most
    with an argument schema) and 50 glob patterns. The mix's tools keep their rules, so the
    same requests are decided by the same rules inside a much larger policy."""
    policy = reference_policy()
    rng = random.Random(5)
    verbs = ["describe", "list", "update", "export", "run"]
    for n in range(BIG_POLICY_TOOLS):
        name = f"tool_{n:04d}_{rng.choice(verbs)}"
        kind = n % 4
        if kind == 0:
            rule: dict[str, Any] = {"action": "allow"}
        elif kind == 1:
            rule = {"action": "deny", "reason": f"{name} is reserved for operators"}
        else:
            rule = {
                "limits": [
                    {
                        "counter": f"c{n:04d}",
                        "window": rng.choice(["second", "minute", "hour", "day", "15m"]),
                        "max": NEVER_DENYING_MAX,
                        "scope": "grant" if kind == 2 else "global",
                    }
                ]
            }
        if kind != 1:
            rule["arguments"] = _argument_schema(rng)
        policy["tools"][name] = rule
    for n in range(BIG_POLICY_PATTERNS):
        pattern = f"family{n:02d}_*_{verbs[n % len(verbs)]}"
        policy["tools"][pattern] = (
            {"action": "deny", "reason": "not for agents"}
            if n % 5 == 0
            else {"arguments": _argument_schema(rng)}
        )
    return policy


def _argument_schema(rng: random.Random) -> dict[str, Any]:
    """A typical tool's argument schema: identifiers, bounded counts, an enum."""
    return {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "pattern": "^[a-z0-9-]{1,64}$"},
            "count": {"type": "integer", "minimum": 1, "maximum": rng.randrange(10, 1000)},
            "mode": {"enum": ["fast", "safe", "dry-run"]},
            "tags": {"type": "array", "maxItems": 20, "items": {"type": "string"}},
        },
        "additionalProperties": False,
    }
