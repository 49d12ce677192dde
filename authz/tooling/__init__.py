"""Tools for policy authors: ``check-policy`` (:mod:`.report`), ``explain``
(:mod:`.explain`) and ``test`` (:mod:`.cases`).

They decide through the very code the service runs (:meth:`authz.engine.Engine.decide_for`:
the server's policy, :func:`authz.plan.plan`, :meth:`authz.engine.Engine.decide`), so what
they print is what the gateway would do.
``explain`` consumes no budget; ``test`` gives every case fresh in-memory counters and a
fixed clock, so a policy's unit tests give the same result on every run and in CI.

Exit codes: ``check-policy`` and ``test``: 0 success, 1 an invalid policy or a failing
case, 2 unusable input (an invalid cases file, an MCP server that cannot be listed).
``explain``: 0 allowed, 1 denied, 2 an invalid policy.
"""
