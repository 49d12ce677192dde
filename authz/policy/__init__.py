"""Loading, validating and compiling the operator's policy. Pure: text in, values out.

A policy that loads must mean what it says, so every problem is reported at once, each
with its path (``tools.start_dicom_export_job.limits[0].window: ...``), and a policy with
any error is refused rather than guessed at. Rules that load but can never match come
back as warnings.

Everything a check needs is compiled here, once: argument schemas into validators, glob
keys into regexes indexed by literal prefix, windows into milliseconds, so a check does a
dict lookup and at most a few regex matches, never a scan over all rules.

Modules: ``model`` (the compiled policy a check reads), ``load`` (files and text),
``validate`` (the published format), ``compile`` (document to model), ``schemas``
(argument schemas), ``globs`` (glob keys), ``lint`` (never-matching warnings), ``texts``
(PHI-safe argument error texts), ``servers`` (a policy for several MCP servers: a body per
server, estate-wide budgets).
"""

from authz.policy.load import load_policy, parse_policy_text, policy_from_bytes, syntax_of
from authz.policy.model import (
    Action,
    ApprovalSpec,
    Limit,
    Policy,
    PolicyError,
    Rule,
    RuleTable,
    Scope,
)
from authz.policy.servers import compile_policy

__all__ = [
    "Action",
    "ApprovalSpec",
    "Limit",
    "Policy",
    "PolicyError",
    "Rule",
    "RuleTable",
    "Scope",
    "compile_policy",
    "load_policy",
    "parse_policy_text",
    "policy_from_bytes",
    "syntax_of",
]
