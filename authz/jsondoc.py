"""Request bodies decoded as strict JSON, every size bound checked before the parse.

Two JSON parsers must never read one body differently (the gateway decides on what it
reads, the MCP server runs what it reads), so whatever they could disagree on is refused:
duplicate keys, invalid UTF-8, a BOM, NaN, numbers beyond a double. Pure: bytes in,
values out; every refusal raises :class:`InvalidJson`, whose text never quotes the body.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import msgspec
import orjson


class InvalidJson(ValueError):
    """A body that is not strict JSON within the bounds; the text says why."""


# Deepest nesting accepted. MCP messages need a handful of levels; a bound well below the
# interpreter's recursion limit keeps every later step (digest, schema checks) safe.
MAX_DEPTH = 128

# How much one body may hold, counted before it is parsed: what a body costs to parse,
# digest and check against a policy grows with these, and the body size alone would allow
# far more. A member (a key and its value, in any object at any level) costs the most; the
# policy's `max_json_members` changes that bound, as Django's
# DATA_UPLOAD_MAX_NUMBER_FIELDS bounds form fields. An array element costs a fraction of a
# member, so its fixed bound is higher.
MAX_MEMBERS = 10_000
MAX_ARRAY_ELEMENTS = 50_000

_BOM = b"\xef\xbb\xbf"
_WHITESPACE = b" \t\r\n"
_TOO_DEEP = f"JSON nested too deeply (over {MAX_DEPTH} levels)"
_OBJECTS_AS_ARRAYS = bytes.maketrans(b"{", b"[")

# orjson writes at most 254 levels and raises TypeError beyond: a document wrapped in
# this many arrays can be written exactly when it is at most MAX_DEPTH levels deep. The
# depth check then costs nothing beyond the serialisation the duplicate check needs
# anyway, however many containers the body holds. tests/test_mcp.py pins orjson's limit.
ORJSON_WRITE_DEPTH = 254
_DEPTH_PADDING = ORJSON_WRITE_DEPTH - MAX_DEPTH

# Every digit becomes "1", every other byte "0": a run of 19 digits (an integer orjson may
# have turned into a float: beyond 64 bits) is then a plain substring search. Both steps
# run in C and create no objects, whatever the body holds.
_DIGIT_MASK = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_DIGIT_RUN = b"1" * 19
# Reads such integers exactly, and as fast as orjson (the standard library's json is far
# slower per number).
_EXACT = msgspec.json.Decoder()


def _without_escaped_backslashes(raw: bytes) -> bytes:
    r"""``raw`` with every escaped backslash (``\\``) blanked out, at the same offsets.

    A JSON string reads backslashes in pairs from the start of each run, and so does
    ``bytes.replace``: every backslash left starts a real escape, so ``\u003a`` is then a
    colon and ``\"`` a quote inside a string (in ``\\u003a`` the text ``u003a`` follows an
    escaped backslash).
    """
    return raw.replace(b"\\\\", b"__")


def _outline(body: bytes) -> bytes:
    """A valid body's JSON outside its strings: each string becomes ``0``, whitespace goes.

    Once escaped backslashes and escaped quotes are blanked out, the quotes left are
    exactly the strings' delimiters, so the pieces between them alternate between outside
    and inside strings. Every step runs in C.
    """
    unescaped = _without_escaped_backslashes(body).replace(b'\\"', b"__")
    return b"0".join(unescaped.split(b'"')[0::2]).translate(None, _WHITESPACE)


def _check_size(body: bytes, max_members: int, colons: int, brackets: int) -> None:
    """Refuse, unparsed, a body with more object members or array elements than allowed.

    Every member has a ':' and every array element but the first a ',', so the raw counts
    bound both (``colons`` and ``brackets``: the body's counts of ':' and '[', which the
    caller needs too) and spare most bodies the outline. In the outline the counts are
    exact for valid JSON: members are its colons, and every non-empty object or array
    holds one element more than it has commas. (Invalid JSON may be refused here for its
    size: it would be refused anyway.)
    """
    if colons <= max_members and (
        # Commas and brackets are bytes of the body: a short body needs no count of them.
        len(body) <= MAX_ARRAY_ELEMENTS or body.count(b",") + brackets <= MAX_ARRAY_ELEMENTS
    ):
        return
    outline = _outline(body)
    if b"[" * (MAX_DEPTH + 1) in outline.translate(_OBJECTS_AS_ARRAYS):
        raise InvalidJson(_TOO_DEEP)  # the apter reason for a deep body
    members = outline.count(b":")
    if members > max_members:
        raise InvalidJson(f"JSON body has more than {max_members} object members")
    non_empty = (
        outline.count(b"[") + outline.count(b"{") - outline.count(b"[]") - outline.count(b"{}")
    )
    if outline.count(b",") + non_empty - members > MAX_ARRAY_ELEMENTS:
        raise InvalidJson(f"JSON body has more than {MAX_ARRAY_ELEMENTS} array elements")


def _decoded_colons(body: bytes, colons: int) -> int:
    """How many colons a valid body holds once its strings are decoded (``colons``: its
    raw count)."""
    if b"\\u003" in body:
        escapes = _without_escaped_backslashes(body)
        colons += escapes.count(b"\\u003a") + escapes.count(b"\\u003A")
    return colons


def _paused_collector(parse: Callable[[bytes], Any], body: bytes) -> Any:
    """``parse(body)`` with the cyclic garbage collector paused while it runs.

    A parse can build 50,000 containers at once: the collector would start every few
    hundred of them and walk its older generations again and again. A parse makes a tree,
    never a cycle, so nothing is lost by letting the next collection see the new objects
    once.
    """
    if not gc.isenabled():
        return parse(body)
    gc.disable()
    try:
        return parse(body)
    finally:
        gc.enable()


def _invalid(body: bytes, error: orjson.JSONDecodeError) -> InvalidJson:
    """Why orjson refused a body, found without parsing it again."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidJson("body is not valid UTF-8")
    if "depth" in error.msg:  # orjson stops at 1024 levels, far beyond MAX_DEPTH
        return InvalidJson(_TOO_DEEP)
    return InvalidJson("invalid JSON")


def decode_json(body: bytes, max_members: int = MAX_MEMBERS) -> Any:
    r"""Decode a body as strict RFC 8259 JSON in UTF-8, or raise :class:`InvalidJson`.

    Refused: a BOM, invalid UTF-8, duplicate keys, more than ``max_members`` object members,
    :data:`MAX_ARRAY_ELEMENTS` array elements or :data:`MAX_DEPTH` levels, and whatever
    orjson does not read as JSON, which includes NaN and Infinity, lone surrogate escapes
    (``"\ud800"``) and numbers beyond a double's range (``1e400``): values that parsers
    read differently.

    orjson alone decides, so no body costs two parses to refuse. It keeps the last of
    duplicate keys, so they are found by counting: every member has one ':' outside
    strings, and orjson writes strings back with their colons unescaped, so its output has
    exactly the body's decoded colons unless a duplicate was dropped, which always removes
    at least one. Integers orjson cannot hold (beyond 64 bits; it makes them floats) are
    the one reason to read a body again, once every bound has held.
    """
    if body.startswith(_BOM):
        raise InvalidJson("body starts with a byte order mark")
    # Each pass over the body costs time per byte: count once, use twice.
    colons, brackets = body.count(b":"), body.count(b"[")
    _check_size(body, max_members, colons, brackets)
    try:
        doc = _paused_collector(orjson.loads, body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(body, exc) from None
    if brackets + body.count(b"{") > MAX_DEPTH:
        # It could be too deep (a depth needs as many brackets, so most bodies are spared
        # this): wrapped, it is too deep exactly when orjson refuses to write it.
        padded = doc
        for _ in range(_DEPTH_PADDING):
            padded = [padded]
        try:
            canonical = orjson.dumps(padded)
        except TypeError:  # deeper than orjson writes: see ORJSON_WRITE_DEPTH
            raise InvalidJson(_TOO_DEEP) from None
    else:
        canonical = orjson.dumps(doc)
    if canonical.count(b":") != _decoded_colons(body, colons):
        raise InvalidJson("duplicate key in JSON object")
    if body.translate(_DIGIT_MASK).find(_DIGIT_RUN) >= 0:
        try:
            return _paused_collector(_EXACT.decode, body)
        except msgspec.DecodeError:  # orjson read it: a disagreement is a refusal too
            raise InvalidJson("invalid JSON") from None
    return doc
