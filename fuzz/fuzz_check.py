"""Coverage-guided fuzzing of the decision path with atheris (libFuzzer).

    make fuzz                                     # ten minutes, corpus kept in .fuzz/
    .venv/bin/python fuzz/fuzz_check.py -max_total_time=20 DIR   # a short run (CI does)

One input is one request: byte 0 picks the policy (default deny or default allow), the
HTTP method and which hostile headers ride along; the rest is the body. Each input runs
through ``envoy.http_request`` → ``Engine.check`` → ``envoy.check_response`` and must give a
well-formed, documented CheckResponse, never an exception, and never an allow for a body
that contains a denied call under any reading (``devstack/hostile.py``). Empty corpus
directories are seeded with the bypass corpus of ``devstack/corpus.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["authz"]):
    from authz import engine, envoy, grants, mcp, policy  # noqa: F401 (instrumented)

from devstack.checks import check_request  # noqa: E402
from devstack.corpus import CORPUS, LOOKALIKES  # noqa: E402
from devstack.hostile import (  # noqa: E402
    ALLOWED_TOOL,
    DENIED_TOOL,
    assert_well_formed,
    contains_denied_call,
    decide,
    engine_for,
)

ENGINES = {name: engine_for(name) for name in ("default-deny", "default-allow")}
METHODS = ("POST", "POST", "POST", "POST", "GET", "DELETE", "PUT", "post")


def request_of(data: bytes) -> tuple[str, str, dict[str, str], bytes]:
    """(policy, HTTP method, headers, body) encoded in one fuzzer input."""
    profile, body = data[0], data[1:]
    headers = {"content-type": "application/json", "authorization": "Bearer fuzz"}
    if profile & 0x08:
        headers["mcp-method"] = "tools/call"
    if profile & 0x10:
        headers["mcp-name"] = DENIED_TOOL if profile & 0x20 else ALLOWED_TOOL
    if profile & 0x40 and not profile & 0x10:
        headers["x-mcp-authz-grant"] = "b-spoofed"
    policy_name = "default-allow" if profile & 0x80 else "default-deny"
    return policy_name, METHODS[profile & 0x07], headers, body


def test_one_input(data: bytes) -> None:
    if not data:
        return
    policy_name, method, headers, body = request_of(data)
    decision, response = decide(ENGINES[policy_name], check_request(body, headers, method))
    assert_well_formed(decision, response)
    if method == "POST" and contains_denied_call(body, policy_name):
        assert not decision.allowed, "a body with a denied call was allowed"


def seed(directories: list[Path]) -> None:
    """Write the bypass corpus into empty corpus directories: a head start for libFuzzer."""
    for directory in directories:
        if any(directory.iterdir()):
            continue
        for i, variant in enumerate([*CORPUS, *LOOKALIKES]):
            if len(variant.body) < 4096:
                (directory / f"seed-{i:03d}").write_bytes(bytes([i % 256]) + variant.body)


def main() -> None:
    seed([Path(arg) for arg in sys.argv[1:] if not arg.startswith("-") and Path(arg).is_dir()])
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
