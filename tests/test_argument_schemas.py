"""Argument schemas evaluated in linear time: the worst inputs get the correct answer.

Each case is one that stalled the event loop (or crashed the check) before: jsonschema's
quadratic ``uniqueItems`` on objects and ``unevaluatedItems``/``unevaluatedProperties``
lookups, ``format: regex`` compiled with Python's ``re`` (RecursionError on ``"(" *
5000``), and ``pattern`` on Python's backtracking ``re``. Timings are not asserted here
(tests/test_bounds.py records them); the answers are.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import _utils as jsonschema_utils

from authz.policy import PolicyError, Rule, compile_policy
from authz.policy.schemas import all_distinct


def rule(arguments: object) -> Rule:
    doc = {"version": "1", "default": "deny", "tools": {"t": {"arguments": arguments}}}
    return compile_policy(doc).tools["t"]


def load_errors(arguments: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        rule(arguments)
    return info.value.errors


UNIQUE_ROWS = {"properties": {"rows": {"type": "array", "uniqueItems": True}}}
REGEX = {"properties": {"filter": {"type": "string", "format": "regex"}}}


# --- uniqueItems ------------------------------------------------------------------------------


def test_eight_thousand_objects_under_unique_items() -> None:
    """Within the default member bound: 8,000 objects of one member each."""
    rows: list[Any] = [{"id": i} for i in range(8_000)]
    assert rule(UNIQUE_ROWS).argument_problems({"rows": rows}) is None
    # The same object again, written differently (float, other key order): a repeat.
    rows = [{"id": i, "tags": [1, {"k": "v"}]} for i in range(7_999)]
    rows.append({"tags": [1.0, {"k": "v"}], "id": 7_998.0})
    assert rule(UNIQUE_ROWS).argument_problems({"rows": rows}) == (
        "arguments.rows: must not repeat items"
    )


@pytest.mark.parametrize(
    ("items", "distinct"),
    [
        ([1, 1.0], False),
        ([True, 1], True),
        ([False, 0, None, "", [], {}], True),
        (["1", 1], True),
        ([[1], ["1"]], True),
        ([{"a": 1, "b": 2}, {"b": 2, "a": 1}], False),
        ([{"a": [1, 2]}, {"a": [2, 1]}], True),
        ([10**30, 10**30 + 1], True),
        ([2**53, 2.0**53], False),
        ([10**30, 1e30], True),  # 1e30 is not exactly 10**30
        ([-0.0, 0], False),
        ([0.1, 0.1], False),
        (["n0x1", 1], True),  # a string that looks like a tagged number
        ([{"x": True}, {"x": 1}], True),
    ],
)
def test_unique_items_uses_json_schema_equality(items: list[Any], distinct: bool) -> None:
    assert all_distinct(items) is distinct


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 0.0, 1.0, 1.5, 2**53, 2.0**53, 10**20])
    | st.sampled_from(["", "a", "1", "n0x1", "true"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "1"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(JSON, max_size=5))
def test_unique_items_agrees_with_jsonschema(items: list[Any]) -> None:
    """jsonschema's own (quadratic) comparison is the oracle on small inputs."""
    assert all_distinct(items) is jsonschema_utils.uniq(items)


# --- format: regex ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("^s3://approved-exports/[a-z0-9-]{1,64}$", True),
        (r"^\d{4}-\d{2}-\d{2}$", True),
        ("(foo|bar)+", True),
        ("(" * 5000, False),  # raised RecursionError out of the check (503) before
        ("a" * 1_000_000, False),  # took seconds to compile before; over the allowance now
        ("(?=lookahead)", False),  # RE2 has no lookaround
        (r"(a)\1", False),  # nor backreferences
        (r"\pL{1000}" * 10, False),  # compiles slowly in RE2 too: over the allowance
        ("[", False),
    ],
)
def test_regex_format_values_are_checked_by_re2(value: str, valid: bool) -> None:
    problems = rule(REGEX).argument_problems({"filter": value})
    if valid:
        assert problems is None
    else:
        assert problems == (
            "arguments.filter: is not a valid regex (RE2 syntax, within one call's allowance)"
        )


def test_many_regex_values_share_one_allowance_per_call() -> None:
    """50,000 short regexes in one call: the first ones are checked, the rest refused;
    the next call has its allowance again."""
    checked = rule({"properties": {"f": {"type": "array", "items": {"format": "regex"}}}})
    problems = checked.argument_problems({"f": [f"a{i}" for i in range(50_000)]})
    assert problems is not None
    assert problems.startswith(
        "arguments.f[962]: is not a valid regex (RE2 syntax, within one call's allowance); "
    )
    assert problems.endswith("; and more")
    assert checked.argument_problems({"f": [f"a{i}" for i in range(100)]}) is None


def test_a_refused_regex_is_not_logged(capfd: pytest.CaptureFixture[str]) -> None:
    """RE2 logs what it refuses unless told not to; an argument may be PHI."""
    rule(REGEX).argument_problems({"filter": "(jane-doe-mrn-4711"})
    out, err = capfd.readouterr()
    assert "jane" not in out + err


# --- pattern and patternProperties ------------------------------------------------------------


def test_a_nested_quantifier_meets_a_long_input() -> None:
    """``^(a+)+$`` backtracks exponentially in Python's re; RE2 answers in linear time."""
    checked = rule({"properties": {"name": {"type": "string", "pattern": "^(a+)+$"}}})
    assert checked.argument_problems({"name": "a" * 50_000 + "!"}) == (
        "arguments.name: does not match the required pattern '^(a+)+$'"
    )
    assert checked.argument_problems({"name": "a" * 50_000}) is None


def test_dollar_matches_only_at_the_end() -> None:
    """Python's ``$`` also matches before a final newline; RE2's (and ECMA-262's) does not."""
    checked = rule({"properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}})
    assert checked.argument_problems({"id": "abc"}) is None
    assert checked.argument_problems({"id": "abc\n"}) is not None


def test_pattern_properties_and_additional_properties_run_on_re2() -> None:
    checked = rule(
        {
            "patternProperties": {"^(x+)+$": {"type": "integer"}},
            "properties": {"a": {}},
            "additionalProperties": False,
        }
    )
    assert checked.argument_problems({"a": 1, "xxx": 2}) is None
    assert checked.argument_problems({"xx": "s"}) == "arguments.xx: must be of type integer"
    long_key = "x" * 5_000 + "!"
    assert checked.argument_problems({"a": 1, long_key: 1, "zz": 2}) == (
        "arguments: unexpected argument(s) '?', 'zz'"
    )
    names = rule({"propertyNames": {"pattern": "^(a|aa)+$"}})
    assert names.argument_problems({"a" * 40 + "b": 1}) == (
        "arguments: does not match the required pattern '^(a|aa)+$'"
    )


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (
            {"properties": {"x": {"pattern": r"(a)\1"}}},
            r"tools.t.arguments.properties.x.pattern: '(a)\\1' is not a pattern RE2 runs: "
            r"invalid escape sequence: \1",
        ),
        (
            {"patternProperties": {"(?<=x)y": {}}},
            "tools.t.arguments.patternProperties: '(?<=x)y' is not a pattern RE2 runs: "
            "invalid perl operator: (?<=",
        ),
        (
            {"propertyNames": {"pattern": "("}},
            "tools.t.arguments.propertyNames.pattern: '(' is not a pattern RE2 runs: missing ): (",
        ),
        (
            {"x-shapes": {"id": {"pattern": "(?!x)"}}, "$ref": "#/x-shapes/id"},
            "tools.t.arguments.x-shapes.id.pattern: '(?!x)' is not a pattern RE2 runs: "
            "invalid perl operator: (?!",
        ),
        (
            {"patternProperties": {"^x": {}}, "unevaluatedProperties": False},
            "tools.t.arguments.unevaluatedProperties: cannot be combined with patternProperties "
            "(tools.t.arguments.patternProperties) in one argument schema",
        ),
    ],
)
def test_patterns_re2_cannot_run_are_refused_at_load(arguments: object, error: str) -> None:
    assert error in load_errors(arguments)


# --- unevaluatedItems and unevaluatedProperties -----------------------------------------------


def test_unevaluated_items_over_fifty_thousand_items() -> None:
    schema = {"properties": {"s": {"prefixItems": [{}], "items": {}, "unevaluatedItems": False}}}
    assert rule(schema).argument_problems({"s": [1] * 50_000}) is None
    contains = {"properties": {"s": {"contains": {"type": "integer"}, "unevaluatedItems": False}}}
    assert rule(contains).argument_problems({"s": [1] * 50_000}) is None
    assert rule(contains).argument_problems({"s": [1] * 49_999 + ["x"]}) == (
        "arguments.s: is not allowed"
    )


def test_unevaluated_properties_over_ten_thousand_members() -> None:
    schema = {
        "properties": {
            "s": {"additionalProperties": {"type": "integer"}, "unevaluatedProperties": False}
        }
    }
    members = {f"k{i}": 1 for i in range(9_990)}
    assert rule(schema).argument_problems({"s": members}) is None
    closed = rule({"properties": {"a": {}}, "unevaluatedProperties": False})
    assert closed.argument_problems({"a": 1}) is None
    assert closed.argument_problems({"a": 1, "b": 2}) == "arguments: is not allowed"
    typed = rule({"properties": {"a": {}}, "unevaluatedProperties": {"type": "string"}})
    assert typed.argument_problems({"a": 1, "b": "x"}) is None
    assert typed.argument_problems({"a": 1, "b": 2}) is not None


def test_the_replaced_keywords_agree_with_jsonschema_on_small_inputs() -> None:
    """Same verdicts as jsonschema's own keywords where those are safe to run."""
    schemas: list[dict[str, Any]] = [
        {"uniqueItems": True},
        {"pattern": "^a[0-9]+$"},
        {"patternProperties": {"^n": {"type": "integer"}}, "additionalProperties": False},
        {"properties": {"a": {}}, "additionalProperties": {"type": "string"}},
        {"prefixItems": [{"type": "integer"}], "unevaluatedItems": False},
        {"allOf": [{"properties": {"a": {}}}], "unevaluatedProperties": False},
    ]
    instances: list[Any] = [
        [1, 1.0],
        [{"a": 1}, {"a": 2}],
        "a12",
        "b12",
        {"n1": 1, "n2": "x"},
        {"n1": 1, "m": 1},
        {"a": 1, "b": "s"},
        {"a": 1, "b": 2},
        [1],
        [1, 2],
        {"a": 1},
    ]
    for schema in schemas:
        ours = rule({"properties": {"v": schema}})
        theirs = jsonschema.Draft202012Validator(schema)
        for instance in instances:
            verdict = ours.argument_problems({"v": instance}) is None
            assert verdict is theirs.is_valid(instance), (schema, instance)
