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


def _load(raw: bytes | None, digest: str, path: Path) -> Policy:
    if raw is None:
        raise PolicyError([f"(file): cannot read {path}: {digest.removeprefix('unreadable: ')}"])
    return policy_from_bytes(raw, syntax_of(path))


async def _swap(path: Path, raw: bytes | None, digest: str, engine: Engine) -> Policy:
    """Compile off the event loop, then put in force; raises :class:`PolicyError`."""
    policy = await asyncio.to_thread(_load, raw, digest, path)
    engine.swap(policy)
    return policy


def _failed(
    path: Path, serving: Policy, exc: PolicyError, on_result: ReloadCallback | None
) -> None:
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
            raw, digest = await asyncio.to_thread(_read, file)
            if not forced and digest in (engine.policy.digest, reported):
                suspect = None
                continue
            old = engine.policy
            try:
                policy = await _swap(file, raw, digest, engine)
            except PolicyError as exc:
                if not forced and digest != suspect:
                    suspect = digest  # report it if it is still this next time
                    continue
                suspect, reported = None, digest
                _failed(file, old, exc, on_result)
                continue
            suspect, reported = None, None
            _succeeded(file, old, policy, on_result)
    finally:
        if sighup:
            loop.remove_signal_handler(signal.SIGHUP)
