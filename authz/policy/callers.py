"""Caller sets: who a request comes from, in the terms the policy names callers.

A caller set (``callers.operators: {scopes: [ecs:write]}``) is compiled once, at load, into
a :class:`CallerSet`; a check derives the caller's :class:`Identity` once (grant, verified
JWT claims and their scopes, mTLS principal, trusted headers) and :func:`recognise` tells
which sets it belongs to. Rules then only test set names, so a rule's variants cost a
set-membership test each, whatever the sets say.

Keys of one set must all match (AND); a rule listing several sets accepts any (OR).
Claims and headers match by equality with one of the accepted values (a claim that is an
array matches when it holds one); principals are exact or globs (``*``); scopes must all
be present in the token's ``scope`` / ``scp`` (see :func:`authz.grants.scopes_of`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from authz.grants import GrantSource, Source, scopes_of
from authz.mcp import HttpRequest
from authz.policy.globs import glob_regex

# The label of a caller in no set the policy names (metrics): never a set name.
OTHER = "other"
KEYS = ("grants", "claims", "scopes", "principals", "headers")


class Identity(msgspec.Struct, frozen=True):
    """What a request says about its caller, derived once per check."""

    grant: str | None = None
    claims: Mapping[str, Any] = msgspec.field(default_factory=dict)
    scopes: frozenset[str] = frozenset()
    principal: str = ""
    headers: Mapping[str, str] = msgspec.field(default_factory=dict)


def _holds(value: object, accepted: frozenset[str]) -> bool:
    """A claim equal to an accepted value, or an array of strings holding one."""
    if isinstance(value, str):
        return value in accepted
    if isinstance(value, list):
        return any(isinstance(item, str) and item in accepted for item in value)
    return False


@dataclass(frozen=True)
class CallerSet:
    """A named set of callers; every key given must match (an empty key is not given)."""

    name: str
    grants: frozenset[str] = frozenset()
    claims: tuple[tuple[str, frozenset[str]], ...] = ()
    scopes: tuple[str, ...] = ()
    principals: tuple[tuple[str, re.Pattern[str]], ...] = ()
    headers: tuple[tuple[str, frozenset[str]], ...] = ()

    def describe(self) -> str:
        """``claims groups=radiology-export; scopes ecs:write``: for tooling output."""

        def pairs(items: tuple[tuple[str, frozenset[str]], ...]) -> str:
            return ", ".join(f"{key}={'|'.join(sorted(values))}" for key, values in items)

        parts = []
        if self.grants:
            parts.append(f"grants {', '.join(sorted(self.grants))}")
        if self.claims:
            parts.append(f"claims {pairs(self.claims)}")
        if self.scopes:
            parts.append(f"scopes {' '.join(self.scopes)}")
        if self.principals:
            parts.append(f"principals {', '.join(text for text, _ in self.principals)}")
        if self.headers:
            parts.append(f"headers {pairs(self.headers)}")
        return "; ".join(parts)

    def _others_match(self, who: Identity) -> bool:
        """Every key but ``scopes`` matches."""
        if self.grants and who.grant not in self.grants:
            return False
        if any(not _holds(who.claims.get(claim), values) for claim, values in self.claims):
            return False
        if self.principals and not any(p.fullmatch(who.principal) for _, p in self.principals):
            return False
        return all(who.headers.get(name, "") in values for name, values in self.headers)

    def missing_scopes(self, who: Identity) -> tuple[str, ...] | None:
        """``()`` when ``who`` belongs to this set; the scopes it lacks when only scopes
        keep it out (a token with them would get in: a step-up); ``None`` otherwise."""
        if not self._others_match(who):
            return None
        return tuple(s for s in self.scopes if s not in who.scopes)


class Caller(msgspec.Struct, frozen=True):
    """Which of the policy's caller sets a request's caller belongs to.

    ``sets``: their names; ``first``: the first of them in the policy's order (what the
    caller is called where one name is wanted), ``None`` for none. ``short``: the sets it
    would belong to with a token carrying more scopes, with every scope each requires
    (what a step-up asks for).
    """

    sets: frozenset[str] = frozenset()
    first: str | None = None
    short: Mapping[str, tuple[str, ...]] = msgspec.field(default_factory=dict)


NOBODY = Caller()


def identity_of(request: HttpRequest, claims: Mapping[str, Any], grant: str | None) -> Identity:
    """The caller's identity: its grant, its verified claims (:func:`authz.grants.claims_of`:
    only a ``jwt`` source has any) and their scopes, the mTLS principal Envoy reported, and
    the headers (caller sets only name headers the proxy sets)."""
    return Identity(
        grant=grant,
        claims=claims,
        scopes=scopes_of(claims) if claims else frozenset(),
        principal=request.peer_principal,
        headers=request.headers,
    )


def recognise(sets: Mapping[str, CallerSet], who: Identity) -> Caller:
    """The sets of ``sets`` (in the policy's order) that ``who`` belongs to."""
    found: list[str] = []
    short: dict[str, tuple[str, ...]] = {}
    for name, caller_set in sets.items():
        missing = caller_set.missing_scopes(who)
        if missing == ():
            found.append(name)
        elif missing is not None:
            short[name] = caller_set.scopes
    return Caller(frozenset(found), found[0] if found else None, short)


def _values(raw: str | list[str]) -> frozenset[str]:
    return frozenset([raw] if isinstance(raw, str) else raw)


def compile_caller_set(
    name: str, raw: Mapping[str, Any], source: GrantSource | None, errors: list[str]
) -> CallerSet:
    """A validated ``callers.<name>`` entry compiled; problems the format cannot express
    (no keys; claims or scopes from a grant source that carries none) go to ``errors``."""
    where = f"callers.{name}"
    if not any(raw.get(key) for key in KEYS):
        errors.append(f"{where}: a caller set needs at least one of {', '.join(KEYS)}")
    for key in ("claims", "scopes"):
        if raw.get(key) and (source is None or source.source is not Source.JWT):
            carried = (
                "the bearer token's hash or --grant-header (the policy has no grants section)"
                if source is None
                else f"grants source {source.source.value!r}"
            )
            errors.append(
                f"{where}.{key}: {carried} carries no verified JWT claims or scopes; "
                "use grants source 'jwt'"
            )
    return CallerSet(
        name=name,
        grants=frozenset(raw.get("grants", ())),
        claims=tuple(
            (claim, _values(values)) for claim, values in sorted(raw.get("claims", {}).items())
        ),
        scopes=tuple(dict.fromkeys(raw.get("scopes", ()))),
        principals=tuple((p, glob_regex(p)) for p in raw.get("principals", ())),
        headers=tuple(
            (header, _values(values)) for header, values in sorted(raw.get("headers", {}).items())
        ),
    )
