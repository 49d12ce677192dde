"""Hot reload: watch the policy file, validate a new version, then swap it in atomically.

The file is re-read every ``interval`` seconds and compared by content (SHA-256), not by
modification time, so every way of replacing it is seen: an editor writing in place, an
atomic rename, and Kubernetes ConfigMap volumes, which swap a ``..data`` symlink to a new
directory (the path is opened afresh each time, so the new target is what is read). SIGHUP
reloads at once.

A new version is compiled off the event loop and put in force with one assignment
(:meth:`authz.engine.Engine.swap`); checks already running finish on the policy they
started with. A broken version changes nothing: the old policy keeps serving, the errors
are logged, and ``on_result("failure", None)`` reports it. An invalid file is reported
only once it has stayed the same for one more interval, so a file caught half-written is
not reported as broken. Counters live in the store under keys built from scope and
counter name, so a limit that keeps its counter, window and scope keeps its counts.

A policy with server files (``servers.NAME: {file: PATH}``) is watched as a whole: the
main file and every server file it names. A broken server file keeps the previous version
of that server while the rest reloads; its errors are logged with the file's path and
reported as a failure (the new version of everything else as a success).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from authz.engine import Engine
from authz.policy import Policy, PolicyError, policy_from_bytes, syntax_of
from authz.policy.model import ServerFile

log = logging.getLogger("mcp_authz.reload")

SUCCESS = "success"
FAILURE = "failure"

ReloadCallback = Callable[[str, Policy | None], None]


def _read(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes and their digest, or ``None`` and a digest of the read error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"
    return raw, hashlib.sha256(raw).hexdigest()


def _load(raw: bytes | None, digest: str, path: Path, previous: Policy) -> Policy:
    if raw is None:
        raise PolicyError([f"(file): cannot read {path}: {digest.removeprefix('unreadable: ')}"])
    return policy_from_bytes(raw, syntax_of(path), base=path.parent, previous=previous)


def _combined(main: str, files: list[str]) -> str:
    if not files:
        return main
    return hashlib.sha256("\n".join([main, *files]).encode()).hexdigest()


def _on_disk(main: str, files: tuple[ServerFile, ...]) -> str:
    """What the files hold now: the main file's digest and those of the server files the
    policy in force names (a change to the main file may name others: it is seen anyway)."""
    return _combined(main, [_read(Path(f.path))[1] for f in files])


def _in_force(policy: Policy) -> str:
    """What the policy in force was read from, as :func:`_on_disk` says it."""
    return _combined(policy.digest, [f.digest for f in policy.files])


def _failed(
    path: Path,
    serving: Policy,
    exc: PolicyError,
    on_result: ReloadCallback | None,
    *,
    partly: bool = False,
) -> None:
    if partly:
        log.error(
            "policy reload: broken server files keep their servers' previous version: %s: %s",
            path,
            "; ".join(exc.errors),
        )
    else:
        log.error(
            "policy reload failed, policy %s keeps serving: %s: %s",
            serving.digest[:12],
            path,
            "; ".join(exc.errors),
        )
    if on_result is not None:
        on_result(FAILURE, None)


def _succeeded(path: Path, old: Policy, policy: Policy, on_result: ReloadCallback | None) -> None:
    log.info("policy reloaded: %s -> %s from %s", old.digest[:12], policy.digest[:12], path)
    for warning in policy.warnings:
        log.warning("policy warning: %s", warning)
    if on_result is not None:
        on_result(SUCCESS, policy)


async def watch_policy(
    path: str | Path,
    engine: Engine,
    on_result: ReloadCallback | None = None,
    *,
    interval: float = 1.0,
    sighup: bool = False,
) -> None:
    """Keep ``engine`` on the latest valid version of the file at ``path`` until cancelled.

    ``interval`` <= 0 turns the polling off (SIGHUP only). With ``sighup``, SIGHUP reloads
    at once (the handler is installed on the running loop and removed on cancel).
    """
    file = Path(path)
    hangup = asyncio.Event()
    loop = asyncio.get_running_loop()
    if sighup:
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
    # Content seen invalid once (maybe half-written), and content already reported broken.
    suspect: str | None = None
    reported: str | None = None
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hangup.wait(), interval if interval > 0 else None)
            forced = hangup.is_set()
            hangup.clear()
            old = engine.policy
            raw, digest = await asyncio.to_thread(_read, file)
            seen = await asyncio.to_thread(_on_disk, digest, old.files)
            if not forced and seen in (_in_force(old), reported):
                suspect = None
                continue
            try:
                # Compiled off the event loop, then put in force with one assignment.
                policy = await asyncio.to_thread(_load, raw, digest, file, old)
                if policy.kept and not forced and seen != suspect:
                    suspect = seen  # a server file may be half-written: look again
                    continue
                engine.swap(policy)
            except PolicyError as exc:
                if not forced and seen != suspect:
                    suspect = seen  # report it if it is still this next time
                    continue
                suspect, reported = None, seen
                _failed(file, old, exc, on_result)
                continue
            suspect, reported = None, None
            if policy.kept:
                _failed(file, old, PolicyError(list(policy.kept)), on_result, partly=True)
            _succeeded(file, old, policy, on_result)
    finally:
        if sighup:
            loop.remove_signal_handler(signal.SIGHUP)
