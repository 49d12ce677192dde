"""What the upstream issued to a grant, as the counter store records it. Pure: keys and
reading responses; the writes are the ext_proc stream's (:mod:`authz.extproc`).

A client names its session (``Mcp-Session-Id``) and its tasks (``taskId``) itself, so
neither can be trusted to be its own: a session budget opened for any id a client
invents would be a fresh budget per invented id, and a task id guessed or seen elsewhere
would reach another grant's results. The ids the upstream issued are therefore recorded
from its responses, under the grant whose request it answered:

- a session id from the ``Mcp-Session-Id`` header of an ``initialize`` response (MCP
  2025-03-26 to 2025-11-25), kept while the session is used (an idle time, renewed by
  every charge against the session's budgets) and dropped when a ``DELETE`` of it
  succeeds;

Every key is under the grant's hash tag, like the grant's counters, so a charge and the
session record it depends on are read and written by one script in one Cluster slot.
The ids are hashed with the grant: bounded keys, and no id can name another grant's.
"""

from __future__ import annotations

import hashlib

# How long a recorded session lasts without a charge against its budgets. An upstream
# keeps a session at least as long as it is in use; a session idle for longer counts
# against its grant's counters from then on (a budget only shrinks).
SESSION_IDLE_MS = 24 * 3_600_000


def _digest(grant: str, value: str) -> str:
    return hashlib.sha256(f"{grant}\n{value}".encode()).hexdigest()[:32]


def grant_prefix(grant: str) -> str:
    """The prefix of every key of ``grant``: its hash tag."""
    return f"mcpauthz:{{g:{grant}}}:"


def session_record(grant: str, session: str) -> str:
    """The key recording that the upstream issued ``session`` to ``grant``. Counter names
    hold no ``:``, so no counter key can be a record's."""
    return f"{grant_prefix(grant)}session:{_digest(grant, session)}"


def session_counter(grant: str, session: str, counter: str) -> str:
    """The key of a session-scoped counter of ``session`` (issued to ``grant``)."""
    return f"{grant_prefix(grant)}s:{_digest(grant, session)}:{counter}"
