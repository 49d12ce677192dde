"""The MCP authorization spec's resource-server side, through the real Envoy running the
shipped envoy/envoy-jwt.yaml (its JWKS read from a file the test writes, so it runs offline),
a real mcp-authz and the demo MCP upstream, with real RS256 and ES256 tokens made here:

- RFC 9728 Protected Resource Metadata answers at both well-known URLs without a token;
- a request without a valid token (missing, expired, wrong audience, wrong issuer, unsigned,
  forged, in the query string) gets 401 with ``WWW-Authenticate: Bearer resource_metadata``
  and reaches neither mcp-authz nor the upstream;
- a valid token passes and its claims reach mcp-authz (the grant is its ``sub``);
- a ``WWW-Authenticate`` header on an ext_authz denied response (the insufficient_scope
  step-up) reaches the client;
- Istio's form: the payload forwarded in a header (``outputPayloadToHeader`` is jwt_authn's
  ``forward_payload_header``), which jwt_authn strips from clients.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import httpx2
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mcp.client.auth.utils import (
    build_protected_resource_metadata_discovery_urls,
    extract_resource_metadata_from_www_auth,
    extract_scope_from_www_auth,
)
from mcp.shared.auth import ProtectedResourceMetadata

from authz.pb import external_auth_pb2, external_auth_pb2_grpc
from tests.support.clients import sdk_call_tool
from tests.support.stack import (
    ROOT,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    upstream_proc,
    wait_ready,
)

pytestmark = pytest.mark.e2e

ENVOY_JWT = ROOT / "envoy" / "envoy-jwt.yaml"
METADATA_PATHS = (
    "/.well-known/oauth-protected-resource/mcp",
    "/.well-known/oauth-protected-resource",
)


# --- the shipped config and the operator's values in it ------------------------------------


def shipped() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(ENVOY_JWT.read_text())
    return config


def manager(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]
    return hcm


def http_filter(config: dict[str, Any], suffix: str) -> dict[str, Any]:
    (found,) = [f for f in manager(config)["http_filters"] if f["name"].endswith(suffix)]
    typed: dict[str, Any] = found["typed_config"]
    return typed


@dataclass(frozen=True)
class OperatorValues:
    """What envoy-jwt.yaml says about this resource, read from where Envoy uses it."""

    metadata: dict[str, Any]  # the RFC 9728 document the metadata route answers
    audiences: list[str]
    issuer: str
    challenges: list[str]  # the WWW-Authenticate values of local_reply_config

    @property
    def resource(self) -> str:
        return str(self.metadata["resource"])

    @property
    def metadata_url(self) -> str:
        """RFC 9728 section 3.1: the well-known path inserted before the resource's path."""
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path}"


def operator_values(config: dict[str, Any]) -> OperatorValues:
    hcm = manager(config)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (route,) = [r for r in routes if r.get("name") == "protected-resource-metadata"]
    provider = http_filter(config, "jwt_authn")["providers"]["idp"]
    challenges = [
        header["header"]["value"]
        for mapper in hcm["local_reply_config"]["mappers"]
        for header in mapper["headers_to_add"]
        if header["header"]["key"] == "www-authenticate"
    ]
    return OperatorValues(
        metadata=json.loads(route["direct_response"]["body"]["inline_string"]),
        audiences=provider["audiences"],
        issuer=provider["issuer"],
        challenges=challenges,
    )


def test_the_operator_values_agree() -> None:
    config = shipped()
    values = operator_values(config)
    assert set(values.metadata) == {
        "resource",
        "authorization_servers",
        "scopes_supported",
        "bearer_methods_supported",
    }
    # RFC 8707: tokens are accepted for exactly this resource, from its authorization server.
    assert values.audiences == [values.resource]
    assert values.metadata["authorization_servers"] == [values.issuer]
    assert values.metadata["bearer_methods_supported"] == ["header"]
    assert values.metadata["scopes_supported"]
    assert urlsplit(values.resource).path == "/mcp"
    # Both 401 challenges name the metadata; only the one for a sent token says why.
    assert values.challenges == [
        f'Bearer error="invalid_token", resource_metadata="{values.metadata_url}"',
        f'Bearer resource_metadata="{values.metadata_url}"',
    ]
    provider = http_filter(config, "jwt_authn")["providers"]["idp"]
    assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]


# --- keys, tokens and the stack ------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey

    def jwks(self) -> str:
        rs = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        es = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        return json.dumps(
            {
                "keys": [
                    {**rs, "kid": "rs", "alg": "RS256", "use": "sig"},
                    {**es, "kid": "es", "alg": "ES256", "use": "sig"},
                ]
            }
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


def claims(values: OperatorValues, sub: str, **override: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": values.issuer,
        "aud": values.resource,
        "sub": sub,
        "iat": now,
        "exp": now + 600,
        "scope": "ecs:read",
        **override,
    }


def rs256(keys: Keys, payload: dict[str, Any], signer: Any = None) -> str:
    return jwt.encode(payload, signer or keys.rsa, algorithm="RS256", headers={"kid": "rs"})


def es256(keys: Keys, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, keys.ec, algorithm="ES256", headers={"kid": "es"})


def unsigned(payload: dict[str, Any]) -> str:
    """``alg: none``: a header and a payload, no signature."""

    def part(doc: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'rs'})}.{part(payload)}."


def offline(config: dict[str, Any], jwks_file: Path) -> dict[str, Any]:
    """The shipped config with its JWKS read from a file, as its header documents."""
    config = copy.deepcopy(config)
    provider = http_filter(config, "jwt_authn")["providers"]["idp"]
    del provider["remote_jwks"]
    provider["local_jwks"] = {"filename": str(jwks_file)}
    clusters = config["static_resources"]["clusters"]
    config["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "idp_jwks"]
    return config


@dataclass
class JwtStack:
    base: str  # http://127.0.0.1:PORT
    record: Path
    metrics: str  # mcp-authz's /metrics URL ("" with a stand-in ext_authz)
    authz_log: Path | None

    @property
    def url(self) -> str:
        return self.base + "/mcp"

    def recorded_grants(self) -> list[str | None]:
        if not self.record.exists():
            return []
        return [json.loads(line)["grant"] for line in self.record.read_text().splitlines()]

    def checks(self) -> float:
        """How many Checks mcp-authz answered (its check-duration histogram's count)."""
        text = httpx.get(self.metrics, timeout=5).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("mcp_authz_check_duration_seconds_count")
        )

    def audit_lines(self) -> list[dict[str, Any]]:
        assert self.authz_log is not None
        lines = []
        for line in self.authz_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and "decision" in doc:
                    lines.append(doc)
        return lines


@contextlib.contextmanager
def jwt_stack(
    tmp: Path, config: dict[str, Any], policy: dict[str, Any] | None, authz_port: int = 0
) -> Iterator[JwtStack]:
    """Envoy with ``config`` in front of the demo upstream, and a real mcp-authz with
    ``policy`` (or, without one, whatever ext_authz server listens on ``authz_port``)."""
    listen, admin, upstream, http_port = (free_port() for _ in range(4))
    grpc_port = authz_port or free_port()
    record = tmp / "record.jsonl"
    source = tmp / "envoy-source.yaml"
    source.write_text(yaml.safe_dump(config))
    envoy = envoy_config(
        tmp, listen=listen, authz=grpc_port, upstream=upstream, admin=admin, source=source
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(upstream_proc(tmp, upstream, record), upstream))
        authz_log = None
        if policy is not None:
            policy_file = tmp / "policy.json"
            policy_file.write_text(json.dumps(policy))
            proc = authz_proc(tmp, policy_file, grpc_port, http_port, ["--store", "memory"])
            stack.enter_context(running(proc, grpc_port))
            authz_log = proc.log
        stack.enter_context(running(envoy_proc(tmp, envoy), listen))
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        yield JwtStack(
            base=f"http://127.0.0.1:{listen}",
            record=record,
            metrics=f"http://127.0.0.1:{http_port}/metrics" if policy is not None else "",
            authz_log=authz_log,
        )


POLICY = {
    "version": "1",
    "default": "deny",
    "grants": {"source": "jwt", "claim": "sub"},
    "tools": {"containerize_app": {"limits": [{"counter": "c", "window": "minute", "max": 5}]}},
}
CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "containerize_app", "arguments": {"app_path": "/a"}},
}


def post(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        url,
        content=json.dumps(CALL),
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2025-11-25",
            **headers,
        },
        timeout=10,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def as_sdk_sees_it(resp: httpx.Response) -> httpx2.Response:
    """The reply as the official MCP SDK's OAuth client reads it (its HTTP client's type)."""
    return httpx2.Response(resp.status_code, headers=list(resp.headers.multi_items()))


# --- the resource server through the real Envoy and mcp-authz -------------------------------


async def test_mcp_authorization_through_envoy(tmp_path: Path, keys: Keys) -> None:
    config = shipped()
    values = operator_values(config)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(keys.jwks())
    with jwt_stack(tmp_path, offline(config, jwks), POLICY) as stack:
        # RFC 9728 metadata: public, JSON, and mcp-authz is not asked. The official SDK
        # looks for it at these two URLs (after the one a 401 names) and accepts it.
        assert build_protected_resource_metadata_discovery_urls(None, values.resource) == [
            urlsplit(values.resource)._replace(path=path).geturl() for path in METADATA_PATHS
        ]
        for path in METADATA_PATHS:
            resp = httpx.get(stack.base + path, timeout=5)
            assert resp.status_code == 200, path
            assert resp.headers["content-type"] == "application/json"
            assert resp.json() == values.metadata
            ProtectedResourceMetadata.model_validate_json(resp.content)

        challenge, challenge_no_token = values.challenges
        refused = {
            "expired": bearer(rs256(keys, claims(values, "a", exp=int(time.time()) - 3600))),
            "wrong audience": bearer(rs256(keys, claims(values, "a", aud="https://other/mcp"))),
            "wrong issuer": bearer(es256(keys, claims(values, "a", iss="https://evil.example/"))),
            "unsigned": bearer(unsigned(claims(values, "a"))),
            "foreign key": bearer(
                rs256(keys, claims(values, "a"), rsa.generate_private_key(65537, 2048))
            ),
            "not a JWT": bearer("not-a-jwt"),
        }
        for name, headers in refused.items():
            resp = post(stack.url, headers)
            assert resp.status_code == 401, name
            assert resp.headers.get_list("www-authenticate") == [challenge], name
            sdk_view = as_sdk_sees_it(resp)
            assert extract_resource_metadata_from_www_auth(sdk_view) == values.metadata_url
        # No bearer token: none at all, another scheme, or a valid token in the query
        # string (the spec forbids it).
        valid = rs256(keys, claims(values, "alice@example.com"))
        for url, headers in (
            (stack.url, {}),
            (stack.url, {"Authorization": "Basic YWxpY2U6cHc="}),
            (f"{stack.url}?access_token={valid}", {}),
        ):
            resp = post(url, headers)
            assert resp.status_code == 401
            assert resp.headers.get_list("www-authenticate") == [challenge_no_token]
            sdk_view = as_sdk_sees_it(resp)
            assert extract_resource_metadata_from_www_auth(sdk_view) == values.metadata_url
        # None of them reached mcp-authz (no Check, no audit line) or the upstream.
        assert stack.checks() == 0
        assert stack.audit_lines() == []
        assert stack.recorded_grants() == []

        # Valid tokens, RS256 and ES256: the claims reach mcp-authz, the grant is the sub.
        text = await sdk_call_tool(stack.url, "containerize_app", {"app_path": "/a"}, bearer(valid))
        assert "/a" in text
        bob = bearer(es256(keys, claims(values, "bob")))
        assert "/b" in await sdk_call_tool(stack.url, "containerize_app", {"app_path": "/b"}, bob)
        assert {"alice@example.com", "bob"} <= set(stack.recorded_grants())
        allowed = [line for line in stack.audit_lines() if line["decision"] == "allow"]
        assert {line["grant"] for line in allowed} == {"alice@example.com", "bob"}
        assert stack.checks() > 0


# --- step-up: a denied response's WWW-Authenticate reaches the client -----------------------

STEP_UP = (
    'Bearer error="insufficient_scope", scope="ecs:write", '
    'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"'
)


class StepUp(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """A stand-in ext_authz that denies every Check as mcp-authz will on missing scopes."""

    def Check(self, request: Any, context: Any) -> external_auth_pb2.CheckResponse:
        response = external_auth_pb2.CheckResponse()
        response.status.code = 7
        denied = response.denied_response
        denied.status.code = 403
        for key, value in (
            ("www-authenticate", STEP_UP),
            ("content-type", "application/json"),
            ("x-mcp-authz-reason", "insufficient scope"),
        ):
            option = denied.headers.add()
            option.header.key = key
            option.header.value = value
        denied.body = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "error": {"code": -32001, "message": "scope needed"}}
        )
        return response


def test_a_denied_response_www_authenticate_reaches_the_client(tmp_path: Path, keys: Keys) -> None:
    config = shipped()
    values = operator_values(config)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(keys.jwks())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(StepUp(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with jwt_stack(tmp_path, offline(config, jwks), None, authz_port=port) as stack:
            resp = post(stack.url, bearer(rs256(keys, claims(values, "alice"))))
            assert resp.status_code == 403
            assert resp.headers.get_list("www-authenticate") == [STEP_UP]
            # The official SDK reads the scope to ask for and where the metadata is.
            sdk_view = as_sdk_sees_it(resp)
            assert extract_scope_from_www_auth(sdk_view) == "ecs:write"
            assert extract_resource_metadata_from_www_auth(sdk_view) == values.metadata_url
            assert resp.headers["x-mcp-authz-reason"] == "insufficient scope"
            assert resp.json()["error"]["message"] == "scope needed"
            # The 401 mapper still answers for a request without a token.
            assert post(stack.url, {}).headers["www-authenticate"] == values.challenges[1]
            assert stack.recorded_grants() == []
    finally:
        server.stop(None)


# --- Istio's form: the verified payload in a header ----------------------------------------

PAYLOAD_HEADER = "x-jwt-payload"


def istio_like(config: dict[str, Any]) -> dict[str, Any]:
    """jwt_authn as Istio configures it from a RequestAuthentication with
    ``outputPayloadToHeader``: the payload goes to a header (forward_payload_header), a
    request without a token passes (an AuthorizationPolicy decides about those), and the
    ext_authz provider gets no jwt_authn metadata."""
    config = copy.deepcopy(config)
    jwt_config = http_filter(config, "jwt_authn")
    provider = jwt_config["providers"]["idp"]
    del provider["payload_in_metadata"]
    provider["forward_payload_header"] = PAYLOAD_HEADER
    jwt_config["rules"][-1]["requires"] = {
        "requires_any": {"requirements": [{"provider_name": "idp"}, {"allow_missing": {}}]}
    }
    del http_filter(config, "ext_authz")["metadata_context_namespaces"]
    return config


async def test_claims_from_the_payload_header_and_client_copies_stripped(
    tmp_path: Path, keys: Keys
) -> None:
    config = shipped()
    values = operator_values(config)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(keys.jwks())
    policy = {
        **POLICY,
        "grants": {"source": "jwt", "claim": "sub", "payload_in_header": PAYLOAD_HEADER},
    }

    def forged(sub: str) -> dict[str, str]:
        payload = json.dumps(claims(values, sub)).encode()
        return {PAYLOAD_HEADER: base64.urlsafe_b64encode(payload).decode().rstrip("=")}

    with jwt_stack(tmp_path, istio_like(offline(config, jwks)), policy) as stack:
        alice = bearer(es256(keys, claims(values, "alice")))
        assert "/a" in await sdk_call_tool(stack.url, "containerize_app", {"app_path": "/a"}, alice)
        assert set(stack.recorded_grants()) == {"alice"}
        # A client's copy never survives: with a token, jwt_authn writes the verified payload
        # over it; without one, it is removed and mcp-authz finds no identity.
        bob = {**bearer(rs256(keys, claims(values, "bob"))), **forged("eve")}
        assert "/b" in await sdk_call_tool(stack.url, "containerize_app", {"app_path": "/b"}, bob)
        assert set(stack.recorded_grants()) == {"alice", "bob"}
        seen = len(stack.recorded_grants())
        resp = post(stack.url, forged("mallory"))
        assert resp.status_code == 403
        assert resp.headers["x-mcp-authz-reason"].endswith(": no grant identity")
        assert len(stack.recorded_grants()) == seen
