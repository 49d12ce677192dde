"""Build artefacts that must not drift: generated protobuf code, the Envoy config, and
RELIABILITY.md (written on purpose only)."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from authz import authz_http, reply
from tests import conftest
from tests.support import reliability

ROOT = Path(__file__).resolve().parents[1]
PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
# Messages only, then the two services (their gRPC stubs too), as `make proto` runs them.
MESSAGE_PROTOS = [
    "authz/pb/core.proto",
    "authz/pb/http_status.proto",
    "authz/pb/processing_mode.proto",
]
SERVICE_PROTOS = ["authz/pb/external_auth.proto", "authz/pb/external_processor.proto"]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerate from proto/ exactly as `make proto` does and compare with authz/pb."""
    site = sysconfig.get_paths()["purelib"]
    base = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        f"-I{site}",
        f"--python_out={tmp_path}",
    ]
    subprocess.run([*base, *MESSAGE_PROTOS], check=True, cwd=ROOT)
    subprocess.run([*base, f"--grpc_python_out={tmp_path}", *SERVICE_PROTOS], check=True, cwd=ROOT)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "authz/pb").glob("*.py") if p.name != "__init__.py"
    )
    assert generated == committed, "run `make proto` and commit authz/pb"
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), (
            f"{rel} is stale against proto/: run `make proto`"
        )


def test_wire_names_match_envoy() -> None:
    """The gRPC method path and message names are what Envoy calls on the wire."""
    from authz.pb import external_auth_pb2

    service = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
    assert service.full_name == "envoy.service.auth.v3.Authorization"
    assert (
        service.methods_by_name["Check"].input_type.full_name
        == "envoy.service.auth.v3.CheckRequest"
    )
    http = external_auth_pb2.AttributeContext.HttpRequest.DESCRIPTOR
    assert http.fields_by_name["raw_body"].number == 12
    assert http.fields_by_name["headers"].number == 3
    response = external_auth_pb2.CheckResponse.DESCRIPTOR
    assert {f.name: f.number for f in response.fields} == {
        "status": 1,
        "denied_response": 2,
        "ok_response": 3,
        "dynamic_metadata": 4,
    }


def test_ext_proc_wire_names_match_envoy() -> None:
    from authz.pb import external_processor_pb2, processing_mode_pb2

    service = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    process = service.methods_by_name["Process"]
    assert process.client_streaming and process.server_streaming
    request = external_processor_pb2.ProcessingRequest.DESCRIPTOR
    assert {f.name: f.number for f in request.fields} == {
        "request_headers": 2,
        "response_headers": 3,
        "request_body": 4,
        "response_body": 5,
        "metadata_context": 8,
        "observability_mode": 10,
    }
    response = external_processor_pb2.ProcessingResponse.DESCRIPTOR
    assert {f.name: f.number for f in response.fields} == {
        "request_headers": 1,
        "response_headers": 2,
        "request_body": 3,
        "response_body": 4,
        "immediate_response": 7,
        "dynamic_metadata": 8,
        "mode_override": 9,
    }
    common = external_processor_pb2.CommonResponse.DESCRIPTOR
    assert common.fields_by_name["body_mutation"].number == 3
    assert common.fields_by_name["clear_route_cache"].number == 5
    mode = processing_mode_pb2.ProcessingMode
    assert mode.DESCRIPTOR.full_name == "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode"
    assert (mode.BUFFERED, mode.BUFFERED_PARTIAL, mode.SKIP) == (2, 3, 2)


@pytest.mark.parametrize(
    "config", ["envoy.yaml", "envoy-http.yaml", "envoy-jwt.yaml", "envoy-servers.yaml"]
)
def test_envoy_config_validates(config: str) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    run = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(ROOT / "envoy" / config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    assert "OK" in run.stdout


def test_envoy_config_fails_closed_and_reads_the_body() -> None:
    config = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f.get("typed_config", {}) for f in hcm["typed_config"]["http_filters"]}
    authz = filters["envoy.filters.http.ext_authz"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["grpc_service"]["timeout"] == "0.25s"
    assert authz["with_request_body"] == {
        "max_request_bytes": 1048576,
        "allow_partial_message": False,
        "pack_as_bytes": True,
    }
    names = list(filters)
    # The client's copy of the trusted grant header is removed before ext_authz reads it.
    assert names.index("envoy.filters.http.header_mutation") < names.index(
        "envoy.filters.http.ext_authz"
    )
    admin = config["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    upstream_routes = [r for r in routes if "route" in r]
    # /mcp only (list requests take their own route there, see below), no route timeout.
    assert {r["match"]["path"] for r in upstream_routes} == {"/mcp"}
    assert all(set(r["match"]) <= {"path", "headers"} for r in upstream_routes)
    assert all(r["route"]["timeout"] == "0s" for r in upstream_routes)


def test_http_envoy_config_fails_closed_and_passes_every_reply_header() -> None:
    """envoy-http.yaml: the same fail-closed ext_authz as envoy.yaml over HTTP, and every
    header of the shared reply (authz/reply.py) let through where it goes."""
    config = yaml.safe_load((ROOT / "envoy/envoy-http.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f.get("typed_config", {}) for f in hcm["typed_config"]["http_filters"]}
    authz = filters["envoy.filters.http.ext_authz"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["http_service"]["server_uri"]["timeout"] == "0.25s"
    assert authz["http_service"]["server_uri"]["cluster"] == "mcp_authz_http"
    assert authz["with_request_body"] == {
        "max_request_bytes": authz_http.MAX_BODY_BYTES,
        "allow_partial_message": False,
    }
    response = authz["http_service"]["authorization_response"]

    def exact(key: str) -> set[str]:
        return {p["exact"] for p in response[key]["patterns"]}

    assert exact("allowed_upstream_headers") == {
        reply.GRANT_HEADER,
        reply.FAIL_OPEN_HEADER,
        reply.DRY_RUN_HEADER,
        reply.LIST_HEADER,
        reply.CALLERS_HEADER,
        reply.SESSION_HEADER,
        reply.TASKS_HEADER,
    }
    assert exact("allowed_client_headers_on_success") == {
        reply.FAIL_OPEN_HEADER,
        reply.DRY_RUN_HEADER,
    }
    assert exact("allowed_client_headers") == {
        "content-type",
        reply.REASON_HEADER,
        "retry-after",
        "www-authenticate",
    }
    assert response["dynamic_metadata_from_headers"]["patterns"] == [
        {"prefix": authz_http.METADATA_HEADER_PREFIX}
    ]
    # What only Envoy may set is removed from clients before anything reads it.
    removed = filters["envoy.filters.http.header_mutation"]["mutations"]["request_mutations"]
    assert {r["remove"] for r in removed} >= {"x-mcp-grant", authz_http.JWT_PAYLOAD_HEADER}
    # 503 denials travel as 424 and are mapped back.
    (mapper,) = hcm["typed_config"]["local_reply_config"]["mappers"]
    wire = mapper["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]
    assert (wire, mapper["status_code"]) == (authz_http.UNAVAILABLE_WIRE_STATUS, 503)


MARKS = ("x-mcp-authz-list", "x-mcp-authz-session", "x-mcp-authz-tasks")


@pytest.mark.parametrize(
    "name", ["envoy.yaml", "envoy-http.yaml", "envoy-jwt.yaml", "envoy-servers.yaml"]
)
def test_envoy_config_filters_only_allowed_list_responses(name: str) -> None:
    """ext_proc runs after ext_authz, fails closed, and is switched off on every route but
    the ones ext_authz sends the requests it marked to (allowed list requests, initialize
    and DELETE, task-augmented calls and tasks/list; a client's marks are removed first),
    each upstream path having all three. On either transport the list filter is the gRPC
    port's."""
    config = yaml.safe_load((ROOT / "envoy" / name).read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    chain = hcm["typed_config"]["http_filters"]
    filters = {f["name"]: f.get("typed_config", {}) for f in chain}
    names = list(filters)
    assert names.index("envoy.filters.http.ext_authz") < names.index("envoy.filters.http.ext_proc")
    assert filters["envoy.filters.http.ext_authz"]["clear_route_cache"] is True
    removed = filters["envoy.filters.http.header_mutation"]["mutations"]["request_mutations"]
    assert {"remove": "x-mcp-authz-list"} in removed
    assert {"remove": "x-mcp-authz-session"} in removed
    assert {"remove": "x-mcp-authz-tasks"} in removed
    proc = filters["envoy.filters.http.ext_proc"]
    assert proc["failure_mode_allow"] is False
    assert proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "mcp_authz"
    # By default nothing is sent (no stream even where no route applies) ...
    assert set(proc["processing_mode"].values()) <= {"SKIP", "NONE"}
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    paths = {r["match"]["path"] for r in routes if "route" in r}
    marked = {
        (r["match"]["path"], h["name"]) for r in routes for h in r["match"].get("headers", [])
    }
    assert marked == {(path, mark) for path in paths for mark in MARKS}
    for route in routes:
        per_filter = route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
        if [h["name"] for h in route["match"].get("headers", [])] == ["x-mcp-authz-list"]:
            # ... but on the list route: the request (ids) and the whole response.
            mode = per_filter["overrides"]["processing_mode"]
            assert mode["request_body_mode"] == "BUFFERED"
            assert mode["response_body_mode"] == "BUFFERED_PARTIAL"
        elif [h["name"] for h in route["match"].get("headers", [])] == ["x-mcp-authz-session"]:
            # ... and on the session route (initialize, DELETE): the headers only, the
            # body streams unbuffered.
            mode = per_filter["overrides"]["processing_mode"]
            assert mode["request_header_mode"] == mode["response_header_mode"] == "SEND"
            assert mode["request_body_mode"] == mode["response_body_mode"] == "NONE"
        elif [h["name"] for h in route["match"].get("headers", [])] == ["x-mcp-authz-tasks"]:
            # ... and on the tasks route (task-augmented calls, tasks/list): the request
            # (ids, for an error reply) and the whole response.
            mode = per_filter["overrides"]["processing_mode"]
            assert mode["request_body_mode"] == "BUFFERED"
            assert mode["response_body_mode"] == "BUFFERED_PARTIAL"
        else:
            assert per_filter == {
                "@type": PER_ROUTE,
                "disabled": True,
            }


def test_reliability_report_is_written_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain test run records figures but leaves the tracked RELIABILITY.md alone;
    ``make reliability`` (the variable set) renders them into it."""
    monkeypatch.setattr(reliability, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(reliability, "REPORT", tmp_path / "RELIABILITY.md")
    reliability.record("A section", "what was measured", {"requests": 10, "lost": 0})
    monkeypatch.delenv(reliability.REPORT_ENV, raising=False)
    conftest.pytest_sessionfinish()
    assert not (tmp_path / "RELIABILITY.md").exists()
    monkeypatch.setenv(reliability.REPORT_ENV, "1")
    conftest.pytest_sessionfinish()
    report = (tmp_path / "RELIABILITY.md").read_text()
    assert "## A section" in report and "| requests | 10 |" in report


def test_make_reliability_runs_every_test_that_records() -> None:
    """The Makefile's list is exactly the test files that record a figure, so none of
    RELIABILITY.md's sections goes stale unnoticed."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^RELIABILITY_TESTS := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert match, "Makefile: RELIABILITY_TESTS is missing"
    listed = set(match.group(1).replace("\\", " ").split())
    recording = {
        f"tests/{path.name}"
        for path in (ROOT / "tests").glob("test_*.py")
        if re.search(r"^\s*record\(", path.read_text(), re.MULTILINE)
    }
    assert listed == recording
