"""The verified JWT claims of a request (grants.claims_of, scopes_of) from both places a
topology delivers them: jwt_authn metadata (the sidecar Envoy) and a payload header (Istio's
outputPayloadToHeader), and the grants section's payload_in_header option."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.grants import JWT_NAMESPACE, GrantSource, Source, claims_of, grant_of, scopes_of
from authz.mcp import HttpRequest
from authz.policy import PolicyError, compile_policy

CLAIMS = {"sub": "alice@example.com", "scope": "ecs:read ecs:write", "groups": ["radiology"]}
METADATA = GrantSource(source=Source.JWT, claim="sub")
HEADER = GrantSource(source=Source.JWT, claim="sub", payload_in_header="x-jwt-payload")


def request(headers: dict[str, str] | None = None, payload: Any = None) -> HttpRequest:
    metadata = {} if payload is None else {JWT_NAMESPACE: {"jwt_payload": payload}}
    return HttpRequest("POST", headers or {}, b"", metadata=metadata)


def encoded(payload: object, *, padded: bool = False, standard: bool = False) -> str:
    raw = json.dumps(payload).encode()
    text = (base64.standard_b64encode if standard else base64.urlsafe_b64encode)(raw).decode()
    return text if padded else text.rstrip("=")


def test_claims_from_jwt_authn_metadata() -> None:
    assert claims_of(request(payload=CLAIMS), METADATA) == CLAIMS
    assert grant_of(request(payload=CLAIMS), METADATA) == "alice@example.com"
    # The metadata source ignores a header, whatever it holds.
    forged = {"x-jwt-payload": encoded({"sub": "mallory"})}
    assert claims_of(request(forged), METADATA) == {}


@pytest.mark.parametrize("form", [{}, {"padded": True}, {"standard": True}])
def test_claims_from_the_payload_header(form: dict[str, bool]) -> None:
    req = request({"x-jwt-payload": encoded(CLAIMS, **form)})
    assert claims_of(req, HEADER) == CLAIMS
    assert grant_of(req, HEADER) == "alice@example.com"
    # The header source ignores metadata: one place per policy.
    assert claims_of(request(payload=CLAIMS), HEADER) == {}


def test_a_payload_with_characters_outside_the_url_alphabet() -> None:
    # "~" encodes to "_" / "/" in the two alphabets: both decode to the same claims.
    claims = {"sub": "~~~?>>>"}
    for standard in (False, True):
        req = request({"x-jwt-payload": encoded(claims, standard=standard)})
        assert claims_of(req, HEADER) == claims


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "not base64!",
        "e30=,e30=",  # two joined copies of the header
        base64.urlsafe_b64encode(b"\xff\xfe not utf-8").decode(),
        base64.urlsafe_b64encode(b"{not json").decode(),
        encoded(["an", "array"]),
        encoded("a string"),
        encoded(42),
        encoded(None),
        base64.urlsafe_b64encode(b"[" * 200_000).decode(),  # deeper than the interpreter goes
        "a",  # a length base64 cannot have
        "e30===",
    ],
)
def test_a_malformed_payload_header_is_no_claims(value: str) -> None:
    req = request({"x-jwt-payload": value})
    assert claims_of(req, HEADER) == {}
    assert grant_of(req, HEADER) is None


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary().map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(),
            lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        ).map(lambda doc: base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()),
    )
)
def test_any_header_value_gives_a_dict_and_never_raises(value: str) -> None:
    req = request({"x-jwt-payload": value})
    claims = claims_of(req, HEADER)
    assert isinstance(claims, dict)
    grant = grant_of(req, HEADER)
    assert grant is None or isinstance(grant, str)
    assert isinstance(scopes_of(claims), frozenset)


def test_no_claims_without_a_jwt_source_or_a_payload() -> None:
    assert claims_of(request(payload=CLAIMS), GrantSource()) == {}
    assert claims_of(request(payload="not an object"), METADATA) == {}
    assert claims_of(request(), METADATA) == {}
    assert claims_of(request(), HEADER) == {}


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "ecs:read  ecs:write"}, {"ecs:read", "ecs:write"}),
        ({"scp": ["ecs:read", "ecs:write", 3, ""]}, {"ecs:read", "ecs:write"}),
        ({"scp": "User.Read Mail.Read"}, {"User.Read", "Mail.Read"}),
        ({"scope": "a", "scp": ["b"]}, {"a", "b"}),
        ({"scope": ["not", "a", "string"]}, set()),
        ({"scope": 7, "scp": {"a": 1}}, set()),
        ({}, set()),
    ],
)
def test_scopes_of(claims: dict[str, Any], scopes: set[str]) -> None:
    assert scopes_of(claims) == scopes


def grants_errors(grants: dict[str, str]) -> list[str]:
    doc = {"version": "1", "default": "deny", "grants": grants}
    with pytest.raises(PolicyError) as caught:
        compile_policy(doc)
    return caught.value.errors


def test_the_grants_section_names_the_payload_header() -> None:
    doc = {
        "version": "1",
        "default": "deny",
        "grants": {"source": "jwt", "claim": "sub", "payload_in_header": "x-jwt-payload"},
    }
    grants = compile_policy(doc).grants
    assert grants == HEADER
    assert "header x-jwt-payload" in grants.describe()
    assert grants_errors({"source": "header", "header": "x-g", "payload_in_header": "x-p"}) == [
        "grants.payload_in_header: only used with source 'jwt'"
    ]
    assert grants_errors(
        {"source": "jwt", "claim": "sub", "payload_in_metadata": "p", "payload_in_header": "x-p"}
    ) == ["grants.payload_in_header: the payload comes from metadata or a header, not both"]
    (error,) = grants_errors({"source": "jwt", "claim": "sub", "payload_in_header": "X-P"})
    assert error.startswith("grants.payload_in_header: 'X-P' does not match")
