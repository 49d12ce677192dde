"""Build artefacts that must not drift: generated protobuf code and the Envoy config."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ["authz/pb/core.proto", "authz/pb/http_status.proto", "authz/pb/external_auth.proto"]


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
    subprocess.run([*base, *PROTOS[:2]], check=True, cwd=ROOT)
    subprocess.run([*base, f"--grpc_python_out={tmp_path}", PROTOS[2]], check=True, cwd=ROOT)
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


@pytest.mark.parametrize("config", ["envoy.yaml", "envoy-http.yaml"])
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
    assert [r["match"] for r in upstream_routes] == [{"path": "/mcp"}]
    assert upstream_routes[0]["route"]["timeout"] == "0s"
