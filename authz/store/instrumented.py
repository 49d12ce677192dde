"""A counter store wrapped to time each call and count its failures, so the backends
themselves stay free of metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from prometheus_client import Counter, Histogram

from authz.store import Charge, CounterStore, Outcome


class InstrumentedStore:
    """A :class:`CounterStore` reporting each ``op`` (``acquire``, ``ping``) to its
    ``durations`` histogram and, when the call raises, to its ``errors`` counter."""

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

    async def close(self) -> None:
        await self.store.close()
