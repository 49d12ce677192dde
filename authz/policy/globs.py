"""Glob keys (``list_*``): their literal prefix, their regex, and whether two can tie."""

from __future__ import annotations

import re
from collections.abc import Iterable


def literal_prefix(key: str) -> str:
    return key.split("*", 1)[0]


def glob_regex(key: str) -> re.Pattern[str]:
    parts = re.split(r"\*+", key)
    return re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL)


def globs_overlap(a: str, b: str) -> bool:
    """True when some name matches both globs (``*`` is any run of characters).

    Dynamic programming over positions: ``meet[i][j]`` says the rest ``a[i:]`` and
    ``b[j:]`` can match a common string.
    """
    n, m = len(a), len(b)
    below: list[bool] = []
    for i in range(n, -1, -1):
        row = [False] * (m + 1)
        for j in range(m, -1, -1):
            if i == n and j == m:
                row[j] = True
            elif i < n and a[i] == "*":
                row[j] = below[j] or (j < m and row[j + 1])
            elif j < m and b[j] == "*":
                row[j] = row[j + 1] or (i < n and below[j])
            else:
                row[j] = i < n and j < m and a[i] == b[j] and below[j + 1]
        below = row
    return below[0]


def pattern_ties(section: str, keys: Iterable[str]) -> list[str]:
    """Globs of equal specificity that can match the same name: which wins is undefined.

    Equal-length literal prefixes that differ can never match the same name, so only
    globs with the very same literal prefix are compared.
    """
    by_prefix: dict[str, list[str]] = {}
    for key in keys:
        if "*" in key:
            by_prefix.setdefault(literal_prefix(key), []).append(key)
    errors = []
    for prefix, group in by_prefix.items():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if globs_overlap(a, b):
                    errors.append(
                        f"{section}.{b}: ties with {section}.{a}: both have the literal prefix "
                        f"{prefix!r} and can match the same name; make one more specific"
                    )
    return errors
