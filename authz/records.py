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
- a task id from the result of a task-augmented ``tools/call`` (MCP 2025-11-25,
  ``result.task.taskId``), kept for the task's own ``ttl`` (at most
  :data:`TASK_TTL_MAX_MS`): ``tasks/get``, ``tasks/result`` and ``tasks/cancel`` pass
  only for a task recorded for the caller's grant, and ``tasks/list`` shows only those.

Every key is under the grant's hash tag, like the grant's counters, so a charge and the
session record it depends on are read and written by one script in one Cluster slot.
The ids are hashed with the grant: bounded keys, and no id can name another grant's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from authz import listing

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
    hold no ``:`` (the names a policy with servers adds start with ``server:`` or
    ``budget:``; see authz.plan.counter_key), so no counter key can be a record's."""
    return f"{grant_prefix(grant)}session:{_digest(grant, session)}"


def session_counter(grant: str, session: str, counter: str) -> str:
    """The key of a session-scoped counter of ``session`` (issued to ``grant``)."""
    return f"{grant_prefix(grant)}s:{_digest(grant, session)}:{counter}"


# How long a task is kept for its grant: its own ttl (the upstream's retention from
# creation), at most this long; a task with no ttl (unlimited) is kept this long too.
# After that, the gateway no longer lets anyone reach it.
TASK_TTL_MAX_MS = 7 * 86_400_000
# Most task ids recorded from one response (a task-augmented call creates one).
MAX_TASKS_PER_RESPONSE = 16

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


class Unreadable(Exception):
    """A tasks/list response that cannot be filtered (fail closed)."""


def task_record(grant: str, task: str) -> str:
    """The key recording that ``task`` was created by a request of ``grant``."""
    return f"{grant_prefix(grant)}task:{_digest(grant, task)}"


def _ttl_ms(task: dict[str, Any]) -> int:
    ttl = task.get("ttl")
    if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0:
        return min(ttl, TASK_TTL_MAX_MS)
    return TASK_TTL_MAX_MS


def _created(message: object) -> tuple[str, int] | None:
    """The task a response message hands out: (task id, ttl in ms), or ``None``.

    MCP 2025-11-25's CreateTaskResult is ``{"task": {"taskId", "ttl", ...}}``; the
    2026-07-28 tasks extension flattens it into the result (``"resultType": "task"``).
    """
    if not isinstance(message, dict) or "method" in message:
        return None  # a request or notification of the server's
    result = message.get("result")
    if not isinstance(result, dict):
        return None
    task = result.get("task")
    if not isinstance(task, dict) and result.get("resultType") == "task":
        task = result
    if isinstance(task, dict) and isinstance(task.get("taskId"), str) and task["taskId"]:
        return task["taskId"], _ttl_ms(task)
    return None


def _messages(content_type: str, body: bytes) -> Iterator[tuple[list[bytes] | None, Any]]:
    """The JSON-RPC documents of a response body: the body itself (JSON), or each event's
    data (an event stream) with the event's lines; ``None`` for an event without data."""
    media = listing.media_type(content_type)
    if media == "application/json":
        yield None, _decode(body)
    elif media == "text/event-stream":
        for lines in listing.events(body):
            raw = listing.event_data(lines)
            yield lines, _decode(raw) if raw.strip() else None
    else:
        raise Unreadable(f"response of content type {media or '(none)'!r}")


def _decode(raw: bytes) -> Any:
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:
        raise Unreadable("response is not valid JSON") from None


def created_tasks(content_type: str, body: bytes) -> list[tuple[str, int]]:
    """The tasks a task-augmented call's response hands out, as (task id, ttl ms).

    A response it cannot read hands out nothing it could record: the caller then cannot
    reach the task through the gateway (fail closed).
    """
    found: list[tuple[str, int]] = []
    try:
        for _, doc in _messages(content_type, body):
            for message in doc if isinstance(doc, list) else [doc]:
                created = _created(message)
                if created is not None and len(found) < MAX_TASKS_PER_RESPONSE:
                    found.append(created)
    except Unreadable:
        return found
    return found


class TaskList:
    """A tasks/list response, read: the task ids it lists, and the body with only the
    caller's own tasks left in (:meth:`filtered`).

    Every response message with a ``result`` is taken for the tasks/list result (the
    request was sent alone: tasks are never batched); it must carry a ``tasks`` array
    of objects with a string ``taskId``, else the response is :class:`Unreadable`.
    """

    def __init__(self, content_type: str, body: bytes) -> None:
        self._parts = list(_messages(content_type, body))
        self.ids: list[str] = []
        for _, doc in self._parts:
            for tasks in self._lists(doc):
                for entry in tasks:
                    task = entry.get("taskId") if isinstance(entry, dict) else None
                    if not isinstance(task, str):
                        raise Unreadable("tasks/list entry without a string taskId")
                    self.ids.append(task)

    @staticmethod
    def _lists(doc: object) -> Iterator[list[Any]]:
        for message in doc if isinstance(doc, list) else [doc]:
            if not isinstance(message, dict) or "method" in message or "result" not in message:
                continue
            result = message["result"]
            tasks = result.get("tasks") if isinstance(result, dict) else None
            if not isinstance(tasks, list):
                raise Unreadable("tasks/list result without its 'tasks' array")
            yield tasks

    def filtered(self, own: Callable[[str], bool]) -> bytes:
        """The body with the tasks ``own`` says are not the caller's removed (in place)."""
        out: list[bytes] = []
        for lines, doc in self._parts:
            changed = False
            for tasks in self._lists(doc):
                tasks[:] = [t for t in tasks if own(t["taskId"])]
                changed = True
            if lines is None:
                out.append(_ENCODER.encode(doc))
            elif not changed:
                out.extend(lines)
            else:
                kept = [ln for ln in lines if ln.rstrip(b"\r\n") and not _is_data(ln)]
                out += [*kept, b"data: ", _ENCODER.encode(doc), b"\n\n"]
        return b"".join(out)


def _is_data(line: bytes) -> bool:
    return line.rstrip(b"\r\n").partition(b":")[0] == b"data"
