"""The policy language of issue #3 at the unit level: YAML, glob keys and their precedence,
argument schemas and their denial texts, windows, costs, scopes, modes, grants, resources
and prompts, warnings, and every error reported at once with its path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.grants import Source
from authz.policy import (
    Action,
    PolicyError,
    RuleTable,
    Scope,
    compile_policy,
    load_policy,
    parse_policy_text,
)
from authz.policy.globs import globs_overlap

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "authz" / "policy.schema.json"


def policy(**sections: Any) -> dict[str, Any]:
    return {"version": "1", "default": "deny", **sections}


def errors_of(doc: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_policy(doc)
    return info.value.errors


EXPORT_SCHEMA = {
    "type": "object",
    "required": ["datastoreId", "outputS3Uri"],
    "properties": {
        "datastoreId": {"enum": ["ds-0001", "ds-0002"]},
        "outputS3Uri": {"type": "string", "pattern": "^s3://approved-exports/"},
        "studyCount": {"type": "integer", "minimum": 1, "maximum": 100},
        "note": {"type": "string", "maxLength": 10, "format": "email"},
    },
    "additionalProperties": False,
}


# --- YAML and the published schema -------------------------------------------------------


def test_yaml_and_json_compile_to_the_same_rules(tmp_path: Path) -> None:
    doc = policy(
        tools={"start_dicom_export_job": {"limits": [{"counter": "c", "window": "90s", "max": 3}]}}
    )
    json_file, yaml_file = tmp_path / "p.json", tmp_path / "p.yaml"
    json_file.write_text(json.dumps(doc))
    yaml_file.write_text(
        'version: "1"\ndefault: deny\ntools:\n  start_dicom_export_job:\n'
        "    limits:\n      - {counter: c, window: 90s, max: 3}\n"
    )
    from_json, from_yaml = load_policy(json_file), load_policy(yaml_file)
    assert from_json.tools["start_dicom_export_job"] == from_yaml.tools["start_dicom_export_job"]
    assert from_yaml.tools["start_dicom_export_job"].limits[0].window_ms == 90_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('version: "1"\ndefault: deny\ndefault: allow\n', "duplicate key 'default'"),
        ('version: "1"\ndefault: deny\ntools: {a: {}, a: {}}\n', "duplicate key 'a'"),
        ('version: "1"\ndefault: deny\ntools:\n  1: {}\n', "keys must be strings"),
        ("x: &a {}\ny: *a\n", "aliases (*name) are not allowed"),
        ("version: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
        ("version: [\n", "invalid YAML"),
    ],
)
def test_yaml_is_safe_and_strict(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_text(text, "yaml")
    assert expected in info.value.errors[0]
    assert info.value.errors[0].startswith("(file): invalid YAML")


def test_published_schema_is_the_one_the_loader_uses_and_editors_can_use() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    editor = jsonschema.Draft202012Validator(schema)
    examples = (
        "healthimaging.policy.json",
        "ecs.policy.yaml",
        "ecs-callers.policy.yaml",
        "policy.json",
        "servers.policy.yaml",
    )
    for example in examples:
        path = ROOT / "examples" / example
        doc = parse_policy_text(path.read_text(), "yaml" if example.endswith("yaml") else "json")
        assert not list(editor.iter_errors(doc)), example
        load_policy(path)
    # A field the file does not define is refused by the loader: it reads the same file.
    assert "unknown field(s) ('colour'" in errors_of(policy(tools={"t": {"colour": "red"}}))[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\ndefault: deny\n",
            "version: 1 is a number, not the string '1'; quote it: version: \"1\"",
        ),
        ("version: 1.0\ndefault: deny\n", "version: 1.0 is a number, not the string '1'; quote it"),
        (
            "version: yes\ndefault: deny\n",
            "version: true is a boolean, not the string '1'; quote it",
        ),
        ('version: "2"\ndefault: deny\n', "version: '1' was expected"),
    ],
)
def test_an_unquoted_yaml_version_says_to_quote_it(text: str, expected: str) -> None:
    (error,) = errors_of(parse_policy_text(text, "yaml"))
    assert error.startswith(expected)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            policy(tool={}),
            "(top level): unknown field(s) ('tool' was unexpected); did you mean 'tools'?",
        ),
        (
            policy(tools={"t": {"limit": []}}),
            "tools.t: unknown field(s) ('limit' was unexpected); did you mean 'limits'?",
        ),
        (
            policy(
                tools={
                    "t": {"limits": [{"counter": "c", "window": "day", "max": 1, "scop": "grant"}]}
                }
            ),
            "tools.t.limits[0]: unknown field(s) ('scop' was unexpected); did you mean 'scope'?",
        ),
        (
            policy(tools={"t": {"limit": [], "reasn": "x", "colour": "red"}}),
            "tools.t: unknown field(s) ('colour', 'limit', 'reasn' were unexpected); "
            "did you mean 'limits' for 'limit', 'reason' for 'reasn'?",
        ),
        (
            policy(resources={"file:///*": {"arguments": {}}}),
            "resources.file:///*: unknown field(s) ('arguments' was unexpected)",
        ),
    ],
)
def test_an_unknown_field_names_the_close_known_one(doc: object, expected: str) -> None:
    assert expected in errors_of(doc)


@pytest.mark.parametrize(
    ("key", "warned"),
    [
        ("datastore-1", True),
        ("data store", True),
        ("clusters/*", True),
        ("a b:c", True),
        ("file:///a", False),
        ("s3:x", False),
        ("file*", False),
        ("*", False),
        ("healthimaging://datastores/*", False),
    ],
)
def test_every_resource_key_that_is_not_a_uri_warns(key: str, warned: bool) -> None:
    warnings = compile_policy(policy(resources={key: {}})).warnings
    assert [w.startswith(f"resources.{key}: not a URI") for w in warnings] == (
        [True] if warned else []
    )


# --- patterns -----------------------------------------------------------------------------


def test_exact_name_then_longest_literal_prefix() -> None:
    compiled = compile_policy(
        policy(
            tools={
                "list_secrets": {"action": "deny"},
                "list_*": {"action": "allow"},
                "list_s*": {"action": "require_approval"},
                "*": {"action": "deny", "reason": "catch-all"},
                "describe_*_v2": {"action": "allow"},
            }
        )
    )
    where = {
        name: compiled.rule_for_tool(name).where
        for name in (
            "list_secrets",
            "list_services",
            "list_tasks",
            "list_",
            "describe_x_v2",
            "describe_x",
            "zz",
        )
    }
    assert where == {
        "list_secrets": "tools.list_secrets",
        "list_services": "tools.list_s*",
        "list_tasks": "tools.list_*",
        "list_": "tools.list_*",
        "describe_x_v2": "tools.describe_*_v2",
        "describe_x": "tools.*",
        "zz": "tools.*",
    }
    assert compiled.tools.patterns() == ["describe_*_v2", "list_s*", "list_*", "*"]
    assert compiled.tools["list_*"].pattern and not compiled.tools["list_secrets"].pattern


def test_ties_are_load_errors_only_when_both_can_match_one_name() -> None:
    errors = errors_of(policy(tools={"list_*": {}, "list_*s": {}, "*_app": {}, "*": {}}))
    assert sorted(errors) == sorted(
        [
            "tools.list_*s: ties with tools.list_*: both have the literal prefix 'list_' and "
            "can match the same name; make one more specific",
            "tools.*: ties with tools.*_app: both have the literal prefix '' and can match the "
            "same name; make one more specific",
        ]
    )
    # Same prefix, but no name ends in both "_v1" and "_v2": not a tie.
    compile_policy(policy(tools={"list_*_v1": {}, "list_*_v2": {}, "get_*": {}, "put_*": {}}))
    assert errors_of(policy(resources={"file:///a/*": {}, "file:///a/*.txt": {}}))


def test_resource_and_prompt_keys_are_globs_too() -> None:
    compiled = compile_policy(
        policy(
            resources={"ecs://clusters/*": {}, "ecs://clusters/prod": {"action": "deny"}},
            prompts={"deploy_*": {"action": "require_approval"}},
        )
    )
    assert compiled.rule_for_resource("ecs://clusters/dev/x").where == "resources.ecs://clusters/*"
    assert compiled.rule_for_resource("ecs://clusters/prod").action is Action.DENY
    assert compiled.rule_for_resource("file:///etc/passwd") is compiled.default
    assert compiled.rule_for_prompt("deploy_checklist").action is Action.REQUIRE_APPROVAL
    assert compiled.rule_for_prompt("other") is compiled.default


_GLOB = st.text(alphabet="ab*", min_size=0, max_size=3)


@settings(max_examples=300, deadline=None)
@given(_GLOB, _GLOB)
def test_glob_overlap_agrees_with_brute_force(a: str, b: str) -> None:
    """Shortest common matches are no longer than both globs' literals together."""

    def regex(g: str) -> re.Pattern[str]:
        return re.compile("".join(".*" if c == "*" else re.escape(c) for c in g))

    ra, rb = regex(a), regex(b)
    words = [""]
    found = ra.fullmatch("") is not None and rb.fullmatch("") is not None
    for _ in range(len(a) + len(b)):
        words = [w + c for w in words for c in "abz"]
        found = found or any(ra.fullmatch(w) and rb.fullmatch(w) for w in words)
    assert globs_overlap(a, b) == found


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet="ab_*", min_size=1, max_size=4), max_size=6, unique=True),
    st.text(alphabet="ab_", max_size=6),
)
def test_indexed_lookup_agrees_with_a_scan(keys: list[str], name: str) -> None:
    """The prefix index finds what a scan in precedence order finds (when the keys load)."""
    doc = policy(tools={k: {"reason": k} for k in keys})
    try:
        compiled = compile_policy(doc)
    except PolicyError:
        return  # a tie: refused, nothing to look up
    table: RuleTable = compiled.tools
    expected = None
    if name in keys and "*" not in name:
        expected = name
    else:
        for key in table.patterns():
            if re.fullmatch(".*".join(re.escape(p) for p in key.split("*")), name, re.DOTALL):
                expected = key
                break
    got = table.match(name)
    assert (got.reason if got else None) == expected


# --- arguments ----------------------------------------------------------------------------


def export_rule() -> Any:
    return compile_policy(policy(tools={"export": {"arguments": EXPORT_SCHEMA}})).tools["export"]


@pytest.mark.parametrize(
    ("arguments", "text"),
    [
        (
            {"datastoreId": "ds-0001", "outputS3Uri": "s3://elsewhere/x"},
            "arguments.outputS3Uri: does not match the required pattern '^s3://approved-exports/'",
        ),
        (
            {"datastoreId": "ds-9", "outputS3Uri": "s3://approved-exports/x"},
            "arguments.datastoreId: is not one of the allowed values",
        ),
        (
            {"outputS3Uri": "s3://approved-exports/"},
            "arguments: missing required argument(s) 'datastoreId'",
        ),
        (
            {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "studyCount": 101},
            "arguments.studyCount: must be at most 100",
        ),
        (
            {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "studyCount": "3"},
            "arguments.studyCount: must be of type integer",
        ),
        (
            {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "extra": 1},
            "arguments: unexpected argument(s) 'extra'",
        ),
        (
            {
                "datastoreId": "ds-0001",
                "outputS3Uri": "s3://approved-exports/",
                "note": "a@b.example.co",
            },
            "arguments.note: must be at most 10 characters long",
        ),
        (
            {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "note": "nope"},
            "arguments.note: is not a valid email",
        ),
    ],
)
def test_argument_denials_name_path_and_rule(arguments: dict[str, Any], text: str) -> None:
    assert export_rule().argument_problems(arguments) == text


def test_valid_arguments_pass() -> None:
    ok = {"datastoreId": "ds-0002", "outputS3Uri": "s3://approved-exports/a", "studyCount": 5}
    assert export_rule().argument_problems(ok) is None


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() and not s.isdigit()))
def test_argument_denials_never_echo_values(secret: str) -> None:
    """Whatever the value (a patient name, say), the denial text does not contain it."""
    value = f"PHI-value:{secret}"
    rule = export_rule()
    for arguments in (
        {"datastoreId": value, "outputS3Uri": value},
        {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "note": value},
        {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "studyCount": value},
        {"datastoreId": "ds-0001", "outputS3Uri": value, value: value},
    ):
        text = rule.argument_problems(arguments)
        assert text is not None and value not in text


def test_unidentifier_like_keys_are_not_echoed() -> None:
    text = export_rule().argument_problems(
        {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/", "Jane Doe": 1}
    )
    assert text == "arguments: unexpected argument(s) '?'"


def test_argument_schemas_are_checked_at_load() -> None:
    errors = errors_of(
        policy(
            tools={
                "a": {"arguments": {"type": "strin"}},
                "b": {"arguments": {"properties": {"x": {"pattern": "("}}}},
                "c": {"arguments": {"$ref": "#/$defs/missing"}},
                "d": {"arguments": {"$ref": "https://example.com/s.json"}},
                "e": {"arguments": {"$schema": "http://json-schema.org/draft-07/schema#"}},
                "f": {"action": "deny", "arguments": {}},
            }
        )
    )
    joined = "\n".join(errors)
    for expected in (
        "tools.a.arguments.type: 'strin' is not valid",
        "tools.b.arguments.properties.x.pattern: '(' is not a pattern RE2 runs: missing ): (",
        "tools.c.arguments.$ref: reference '#/$defs/missing' does not resolve",
        "tools.d.arguments.$ref: only local references (#/...) are supported",
        "tools.e.arguments.$schema: argument schemas are JSON Schema draft 2020-12",
        "tools.f: a denied tool checks no arguments",
    ):
        assert expected in joined, expected
    ok = compile_policy(
        policy(
            tools={
                "g": {
                    "arguments": {
                        "$defs": {"uri": {"type": "string", "pattern": "^s3://"}},
                        "properties": {"u": {"$ref": "#/$defs/uri"}},
                    }
                }
            }
        )
    )
    assert ok.tools["g"].argument_problems({"u": "https://x"}) == (
        "arguments.u: does not match the required pattern '^s3://'"
    )


def test_resources_take_no_argument_schema() -> None:
    assert errors_of(policy(resources={"file:///*": {"arguments": {}}})) == [
        "resources.file:///*: unknown field(s) ('arguments' was unexpected)"
    ]


# --- limits: windows, costs, scopes -------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "ms", "text"),
    [
        ("second", 1_000, "second"),
        ("day", 86_400_000, "day"),
        ("90s", 90_000, "90 s"),
        ("15m", 900_000, "15 min"),
        ("2h", 7_200_000, "2 h"),
        ("7d", 604_800_000, "7 days"),
        ("60m", 3_600_000, "hour"),
    ],
)
def test_windows(window: str, ms: int, text: str) -> None:
    compiled = compile_policy(
        policy(tools={"t": {"limits": [{"counter": "c", "window": window, "max": 1}]}})
    )
    (limit,) = compiled.tools["t"].limits
    assert (limit.window_ms, limit.window_text) == (ms, text)


@pytest.mark.parametrize("window", ["week", "0s", "1.5h", "10", "-5m", "5M", "", "367d"])
def test_bad_windows(window: str) -> None:
    (error,) = errors_of(
        policy(tools={"t": {"limits": [{"counter": "c", "window": window, "max": 1}]}})
    )
    assert error.startswith("tools.t.limits[0].window: ")


def test_costs() -> None:
    limits = [
        {"counter": "calls", "window": "minute", "max": 10, "cost": 2},
        {"counter": "studies", "window": "day", "max": 500, "cost": "/studyCount"},
        {"counter": "nested", "window": "day", "max": 50, "cost": "/job/items/1/n~1x"},
    ]
    rule = compile_policy(policy(tools={"t": {"limits": limits}})).tools["t"]
    calls, studies, nested = rule.limits
    assert calls.cost_of({}) == 2
    assert studies.cost_of({"studyCount": 7}) == 7
    assert studies.cost_of({"studyCount": 7.0}) == 7
    assert studies.cost_of({"studyCount": 0}) == 0
    assert nested.cost_of({"job": {"items": [{}, {"n/x": 3}]}}) == 3
    problems = {
        "missing": studies.cost_of({}),
        "string": studies.cost_of({"studyCount": "7"}),
        "bool": studies.cost_of({"studyCount": True}),
        "fraction": studies.cost_of({"studyCount": 2.5}),
        "negative": studies.cost_of({"studyCount": -1}),
        "too big": studies.cost_of({"studyCount": 501}),
        "nested missing": nested.cost_of({"job": {"items": [{}]}}),
    }
    assert problems == {
        "missing": "arguments.studyCount: missing; it is the call's cost for counter 'studies'",
        "string": "arguments.studyCount: must be a whole number; it is the call's cost for "
        "counter 'studies'",
        "bool": "arguments.studyCount: must be a whole number; it is the call's cost for "
        "counter 'studies'",
        "fraction": "arguments.studyCount: must be a whole number; it is the call's cost for "
        "counter 'studies'",
        "negative": "arguments.studyCount: must not be negative; it is the call's cost for "
        "counter 'studies'",
        "too big": "arguments.studyCount: more than the whole budget of counter 'studies' "
        "(500 per day)",
        "nested missing": 'arguments.job.items[1]["n/x"]: missing; it is the call\'s cost '
        "for counter 'nested'",
    }


def test_cost_errors_at_load() -> None:
    errors = errors_of(
        policy(
            tools={
                "t": {
                    "limits": [
                        {"counter": "b", "window": "minute", "max": 5, "cost": "studyCount"},
                        {"counter": "c", "window": "minute", "max": 5, "cost": 0},
                    ]
                },
                "u": {"limits": [{"counter": "a", "window": "minute", "max": 5, "cost": 6}]},
            }
        )
    )
    assert errors == [
        "tools.t.limits[0].cost: 'studyCount' must be a positive integer, or a JSON pointer "
        "into the arguments such as /studyCount",
        "tools.t.limits[1].cost: 0 must be a positive integer, or a JSON pointer into the "
        "arguments such as /studyCount",
        "tools.u.limits[0].cost: 6 is more than max 5, so every call would be refused",
    ]


def test_scopes_and_shared_counters() -> None:
    lim = {"counter": "s", "window": "minute", "max": 5, "scope": "session"}
    compiled = compile_policy(policy(tools={"a": {"limits": [lim]}, "b": {"limits": [lim]}}))
    assert compiled.tools["a"].limits[0].scope is Scope.SESSION
    errors = errors_of(
        policy(
            tools={
                "a": {"limits": [lim]},
                "b": {"limits": [{**lim, "scope": "grant"}]},
                "c": {"mode": "dry-run", "limits": [lim]},
            }
        )
    )
    assert errors == [
        "tools.b.limits[0]: counter 's' is also defined at tools.a.limits[0] with a different "
        "window, max or scope",
        "tools.c.limits[0]: counter 's' is shared with tools.a.limits[0], but one rule is in "
        "dry-run mode and the other enforces",
    ]


# --- actions, modes, grants -----------------------------------------------------------------


def test_modes() -> None:
    compiled = compile_policy(
        policy(
            mode="dry-run",
            tools={"a": {}, "b": {"mode": "enforce"}},
            resources={"file:///*": {"mode": "dry-run"}},
        )
    )
    assert compiled.dry_run and compiled.default.dry_run
    assert compiled.tools["a"].dry_run and not compiled.tools["b"].dry_run
    enforced = compile_policy(policy(tools={"a": {"mode": "dry-run"}, "b": {}}))
    assert not enforced.default.dry_run
    assert enforced.tools["a"].dry_run and not enforced.tools["b"].dry_run


def test_actions() -> None:
    compiled = compile_policy(
        {"version": "1", "default": "require_approval", "tools": {"t": {"action": "deny"}}}
    )
    assert compiled.default.action is Action.REQUIRE_APPROVAL
    assert compiled.tools["t"].action is Action.DENY


@pytest.mark.parametrize(
    ("grants", "source", "errors"),
    [
        ({"source": "bearer"}, Source.BEARER, []),
        ({"source": "header", "header": "x-mcp-grant"}, Source.HEADER, []),
        ({"source": "jwt", "claim": "sub"}, Source.JWT, []),
        ({"source": "mtls"}, Source.MTLS, []),
        ({"source": "header"}, None, ["grants: 'header' is a required property"]),
        ({"source": "jwt"}, None, ["grants: 'claim' is a required property"]),
        (
            {"source": "bearer", "claim": "sub"},
            None,
            ["grants.claim: only used with source 'jwt'"],
        ),
        (
            {"source": "header", "header": "X-Grant"},
            None,
            ["grants.header: 'X-Grant' does not match '^[a-z0-9-]{1,64}$'"],
        ),
    ],
)
def test_grants_section(grants: dict[str, str], source: Source | None, errors: list[str]) -> None:
    doc = policy(grants=grants)
    if source is None:
        assert errors_of(doc) == errors
        return
    compiled = compile_policy(doc)
    assert compiled.grants is not None and compiled.grants.source is source


# --- errors at once, warnings -------------------------------------------------------------


def test_schema_and_compile_errors_are_reported_together() -> None:
    errors = errors_of(
        policy(
            tools={
                "start_dicom_export_job": {
                    "limits": [{"counter": "c", "window": "week", "max": 1}]
                },
                "a": {"limits": [{"counter": "shared", "window": "minute", "max": 1}]},
                "b": {"limits": [{"counter": "shared", "window": "hour", "max": 1}]},
                "list_*": {},
                "list_*x": {},
            }
        )
    )
    assert errors == [
        "tools.start_dicom_export_job.limits[0].window: 'week' must be second, minute, hour, "
        "day, or a duration such as 90s, 15m, 2h, 7d",
        "tools.list_*x: ties with tools.list_*: both have the literal prefix 'list_' and can "
        "match the same name; make one more specific",
        "tools.b.limits[0]: counter 'shared' is also defined at tools.a.limits[0] with a "
        "different window, max or scope",
    ]


def test_warnings_for_rules_that_never_match() -> None:
    compiled = compile_policy(
        policy(
            tools={
                "delete\u200bapp": {"action": "deny"},
                "export": {
                    "arguments": {
                        "properties": {"n": {"type": "string"}},
                        "additionalProperties": False,
                    },
                    "limits": [
                        {"counter": "a", "window": "day", "max": 9, "cost": "/count"},
                        {"counter": "b", "window": "day", "max": 9, "cost": "/n"},
                    ],
                },
                "nothing": {"arguments": False},
            },
            resources={"clusters/*": {}, "ecs://*": {}, "*": {}},
        )
    )
    assert sorted(compiled.warnings) == sorted(
        [
            "tools.delete\u200bapp: the name has blank, invisible or non-normalized characters;"
            " requests naming it are refused as malformed, so this rule never matches",
            "tools.export.limits[0].cost: /count names an argument the arguments schema does "
            "not allow, so every call is denied",
            "tools.export.limits[1].cost: /n is declared as string, not a number, so every "
            "call is denied",
            "tools.nothing.arguments: false denies every call as invalid; use action deny instead",
            "resources.clusters/*: not a URI (no scheme such as file: or https:), and resource"
            " URIs always have one, so this rule never matches",
        ]
    )
    assert not compile_policy(policy(tools={"list_*": {}})).warnings
