"""Property tests (hypothesis) on the parser and the decision path.

For generated bodies and headers, from raw bytes to structured JSON-RPC with look-alike
names, ids of every type, duplicate keys, escapes and batches:

- no exception escapes the decision path or the gRPC ``Check`` method;
- every reply is a well-formed CheckResponse carrying the documented denial;
- a body that contains a denied call, read any way a JSON parser might, is never allowed.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz import mcp
from authz.decision import Reason
from authz.metrics import Metrics
from authz.server import AuthorizationService
from devstack.checks import check_request
from devstack.hostile import (
    ALLOWED_TOOL,
    DENIED_TOOL,
    POLICIES,
    assert_well_formed,
    contains_denied_call,
    decide,
    engine_for,
    run,
)
from tests.support.reliability import record

ROOT = Path(__file__).resolve().parents[1]

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies ---------------------------------------------------------------------------

LOOKALIKE_EDITS = [
    lambda s: s,
    str.upper,
    str.title,
    lambda s: s + " ",
    lambda s: "\t" + s,
    lambda s: s[:2] + "\u200b" + s[2:],
    lambda s: s + "\u0000",
    lambda s: s.replace("a", "\u0430"),
    lambda s: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s),
    lambda s: s.replace("e", "e\u0301"),
    lambda s: "\u202e" + s,
]


def lookalike(words: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda w, edit: edit(w),
        st.sampled_from(words),
        st.sampled_from(LOOKALIKE_EDITS),
    )


TOOLS = [DENIED_TOOL, ALLOWED_TOOL, "start_dicom_export_job"]
names = st.one_of(st.sampled_from(TOOLS), lookalike(TOOLS), st.text(max_size=12))
methods = st.one_of(
    st.sampled_from([*sorted(mcp.KNOWN_METHODS), "notifications/initialized"]),
    lookalike(["tools/call", "tools/list", "initialize"]),
    st.text(max_size=12),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=6), scalars)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed JSON-RPC (so the policy is reached), sometimes subtly not."""
    rng = draw(st.randoms(use_true_random=True))
    msg: dict[str, Any] = {}
    if rng.random() < 0.95:
        msg["jsonrpc"] = "2.0" if rng.random() < 0.95 else draw(st.sampled_from(["1.0", 2.0]))
    if rng.random() < 0.8:
        msg["id"] = rng.randrange(-5, 10**6) if rng.random() < 0.8 else draw(ids)
    shape = rng.random()
    if shape < 0.9:
        msg["method"] = "tools/call" if rng.random() < 0.6 else draw(methods)
        params: dict[str, Any] = {}
        if rng.random() < 0.95:
            params["name"] = draw(names) if rng.random() < 0.95 else draw(json_values)
        if rng.random() < 0.5:
            params["arguments"] = draw(json_values)
        if rng.random() < 0.1:
            params[draw(st.text(max_size=5))] = draw(json_values)
        msg["params"] = params if rng.random() < 0.97 else draw(json_values)
    elif shape < 0.97:
        msg[draw(st.sampled_from(["result", "error"]))] = draw(json_values)
    if rng.random() < 0.05:
        msg[draw(st.sampled_from(["extra", "result", "Method", "params"]))] = draw(json_values)
    return msg


def _escape_some(text: str, rng: random.Random) -> str:
    """Write some characters of the JSON text's string contents as \\u escapes."""
    out: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string and not escaped and ch not in '"\\' and rng.random() < 0.3:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else ch)
            continue
        if ch == '"' and not escaped:
            in_string = not in_string
        escaped = ch == "\\" and not escaped
        out.append(ch)
    return "".join(out)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """JSON-RPC-shaped bodies, serialized in varied ways, sometimes damaged on purpose."""
    doc: Any = draw(messages())
    if draw(st.integers(0, 3)) == 0:
        doc = draw(st.lists(messages(), min_size=1, max_size=4))
    text = json.dumps(
        doc,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :\n")])),
        sort_keys=draw(st.booleans()),
    )
    rng = draw(st.randoms(use_true_random=True))
    edit = rng.randrange(12)  # 0-3: a deliberate edit; otherwise the text as serialized
    if edit == 0:
        text = _escape_some(text, rng)
    elif edit == 1 and '"name"' in text:
        # Smuggle a second name next to the first.
        at = text.find('"name"')
        text = text[:at] + f'"name":"{DENIED_TOOL}",' + text[at:]
    elif edit == 2:
        text = "\ufeff" + text
    raw = text.encode("utf-8", "surrogatepass")
    if edit == 3 and raw:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1 :]
    return raw


header_values = st.one_of(
    st.sampled_from(["tools/call", DENIED_TOOL, ALLOWED_TOOL, "=?base64?ZGVsZXRlX2FwcA==?="]),
    st.text(max_size=10),
)


@st.composite
def header_maps(draw: st.DrawFn) -> dict[str, str]:
    """Mostly what a real client sends, sometimes a hostile variation of one header."""
    rng = draw(st.randoms(use_true_random=True))
    headers: dict[str, str] = {}
    if rng.random() < 0.95:
        headers["content-type"] = (
            "application/json"
            if rng.random() < 0.9
            else draw(st.sampled_from(["Application/JSON; charset=utf-8", "text/plain"]))
        )
    if rng.random() < 0.9:
        headers["authorization"] = (
            "Bearer fuzz"
            if rng.random() < 0.9
            else draw(st.sampled_from(["Bearer a,Bearer b", "Basic eA=="]) | st.text())
        )
    for name in ("mcp-method", "mcp-name", "content-encoding", "x-mcp-authz-grant"):
        if rng.random() < 0.05:
            headers[name] = draw(header_values)
    if rng.random() < 0.03:
        headers["x-envoy-auth-partial-body"] = draw(st.sampled_from(["true", "false", "TRUE"]))
    return headers


http_methods = st.sampled_from(["POST"] * 20 + ["GET", "DELETE", "PUT", "post", "HEAD"])

# --- properties ---------------------------------------------------------------------------

_tally: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_tally() -> object:
    yield
    if _tally:
        record(
            "Property tests (hypothesis)",
            "Generated requests run through the decision path (envoy.http_request, "
            "Engine.check, envoy.check_response) under a default-deny and a default-allow "
            "policy; each reply checked to be a well-formed documented CheckResponse.",
            {k: _tally[k] for k in sorted(_tally)},
        )


def _count(key: str) -> None:
    _tally[key] = _tally.get(key, 0) + 1


def _run(policy: str, body: bytes, headers: dict[str, str], method: str) -> None:
    decision, response = decide(engine_for(policy), check_request(body, headers, method))
    assert_well_formed(decision, response)
    _count("inputs tried")
    _count(f"answered {decision.reason.code}")
    if method.upper() == "POST" and contains_denied_call(body, policy):
        _count("inputs containing a denied call")
        assert not decision.allowed, (body, headers)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@PROPERTY
@given(body=bodies(), headers=header_maps(), method=http_methods)
def test_structured_bodies(policy: str, body: bytes, headers: dict[str, str], method: str) -> None:
    _run(policy, body, headers, method)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@PROPERTY
@given(body=st.binary(max_size=300), headers=header_maps(), method=http_methods)
def test_raw_bytes(policy: str, body: bytes, headers: dict[str, str], method: str) -> None:
    _run(policy, body, headers, method)


@PROPERTY
@given(body=bodies())
def test_parser_only_raises_malformed(body: bytes) -> None:
    """The parser refuses with Malformed and nothing else, and accepts only what the
    strict reading and every lenient reading agree on."""
    try:
        parsed = mcp.parse_body(body)
    except mcp.Malformed as exc:
        assert exc.problem is mcp.Problem.MALFORMED and exc.detail
        return
    doc = json.loads(body)
    assert json.loads(body, object_pairs_hook=lambda p: dict(reversed(p))) == doc
    expected = doc if isinstance(doc, list) else [doc]
    assert len(parsed.messages) == len(expected)
    for msg, raw in zip(parsed.messages, expected, strict=True):
        assert msg.method == raw.get("method")
        if msg.method == "tools/call":
            assert msg.name == raw["params"]["name"]
            assert not mcp.suspicious_name(msg.name)


@PROPERTY
@given(
    body=st.one_of(bodies(), st.binary(max_size=200)),
    headers=header_maps(),
    method=http_methods,
)
def test_check_never_raises(body: bytes, headers: dict[str, str], method: str) -> None:
    """The gRPC method itself (with metrics and the audit line): whatever arrives, it
    returns a CheckResponse, and never the internal-error denial."""
    response = run(_SERVICE.Check(check_request(body, headers, method), None))
    kind = response.WhichOneof("http_response")
    assert kind in ("ok_response", "denied_response")
    if kind == "denied_response":
        reply = json.loads(response.denied_response.body)
        first = reply[0] if isinstance(reply, list) else reply
        assert first["error"]["data"]["reason"] != Reason.INTERNAL_ERROR.code


_SERVICE = AuthorizationService(engine_for("default-deny"), Metrics())


def test_some_inputs_reach_each_outcome() -> None:
    """The generators are not degenerate: the runs above saw allows and denials."""
    if not _tally:
        pytest.skip("ran alone")
    assert _tally.get("answered allowed", 0) > 0
    assert _tally.get("answered malformed_request", 0) > 0
    assert _tally.get("inputs containing a denied call", 0) > 0


def test_suspicious_characters_are_exactly_the_unicode_categories() -> None:
    """``suspicious_name`` uses ``str.isprintable`` for speed; over every code point it must
    flag exactly Unicode's Other and Separator categories (what it promises to refuse)."""
    refused = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        expected = unicodedata.category(ch) in refused
        assert mcp.suspicious_name("a" + ch + "a") is (
            expected or unicodedata.normalize("NFKC", "a" + ch + "a") != "a" + ch + "a"
        ), hex(code)


def test_atheris_short_run(tmp_path: Path) -> None:
    """The coverage-guided harness of ``make fuzz`` runs, seeded with the bypass corpus,
    and finds nothing in a short run (the long run is ``make fuzz``)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seconds = 15
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "fuzz_check.py"),
            f"-max_total_time={seconds}",
            f"-dict={ROOT / 'fuzz' / 'mcp.dict'}",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done, result.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))
    runs = int(done.group(1))
    assert runs > 1000
    record(
        "Fuzzing (atheris, short run)",
        f"libFuzzer-driven inputs through the decision path for {seconds} s, seeded with "
        "the bypass corpus (`make fuzz` runs it for 10 minutes).",
        {"inputs tried": runs, "crashes or invariant violations": 0},
    )
