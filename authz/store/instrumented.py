"""A counter store wrapped to time each call and count its failures, so the backends
themselves stay free of metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import Counter, Histogram

from authz.store import Charge, CounterStore, Outcome


class InstrumentedStore:
    """A :class:`CounterStore` reporting each ``op`` (``acquire``, ``ping``, ``record``,
    ``lookup``) to its ``durations`` histogram and, when the call raises, to its ``errors``
    counter."""

    def __init__(
        self,
        store: CounterStore,
        durations: Mapping[str, Histogram],
        errors: Mapping[str, Counter],
    ) -> None:
        self.store = store
        self._duration = durations
        self._errors = errors

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        started = time.perf_counter()
        try:
            return await self.store.acquire(charges, now_ms)
        except Exception:
            self._errors["acquire"].inc()
            raise
        finally:
            self._duration["acquire"].observe(time.perf_counter() - started)

    async def ping(self) -> None:
        started = time.perf_counter()
        try:
            await self.store.ping()
        except Exception:
            self._errors["ping"].inc()
            raise
        finally:
            self._duration["ping"].observe(time.perf_counter() - started)

    async def record(self, key: str, ttl_ms: int) -> None:
        with self._timed("record"):
            await self.store.record(key, ttl_ms)

    async def forget(self, key: str) -> None:
        with self._timed("record"):
            await self.store.forget(key)

    async def recorded(self, keys: Sequence[str]) -> tuple[bool, ...]:
        with self._timed("lookup"):
            return await self.store.recorded(keys)

    @contextlib.contextmanager
    def _timed(self, op: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self._errors[op].inc()
            raise
        finally:
            self._duration[op].observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self.store.close()
