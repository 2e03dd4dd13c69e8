"""A client-side rate limiter shared by every request of one process.

Partner Center allows 500 requests per minute per partner tenant for customers, subscriptions and orders and answers
429 + ``Retry-After`` beyond that. Bursting and then eating 429s wastes the budget, so requests are *paced*: each one
reserves the next free slot on a timeline spaced ``60 / rate`` seconds apart (a GCRA / virtual scheduling limiter,
no burst). A 429 anywhere slows the whole limiter: every caller waits out ``Retry-After`` and the rate is halved;
it then grows back additively towards the configured ceiling (AIMD).

In the app, this limiter is the per-process safety net behind the budget all instances share through Table Storage
(:mod:`d365_migration._budget`): it only binds after a 429, or while that table is unreachable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol


class Pacer(Protocol):
    """What the client needs from a limiter: a slot per request attempt, and news of 429s and successes."""

    async def acquire(self) -> None: ...

    def on_throttled(self, retry_after: float) -> None: ...

    def on_success(self) -> None: ...

__all__ = [
    "Pacer",
    "RateLimiter",
]


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float,
        *,
        safety: float = 0.95,
        min_fraction: float = 0.1,
        recovery_per_success: float = 0.01,
        catch_up: float = 0.04,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be positive")
        # Pace a little under the documented ceiling: the server counts in a sliding window and latency jitter
        # would otherwise push a window over it.
        self.ceiling = requests_per_minute * safety / 60.0  # requests per second
        self.rate = self.ceiling
        self._floor = self.ceiling * min_fraction
        self._recovery = self.ceiling * recovery_per_success
        # A late wake-up (a busy event loop) may be made up, but only this much: with 5% headroom, no one-second
        # window can exceed the limit even against a per-second counter.
        self._catch_up = catch_up
        self._next: float | None = None
        self._paused_until = 0.0
        self._clock = clock
        self._sleep = sleep
        self.throttle_events = 0

    async def acquire(self) -> None:
        """Wait for this request's slot."""
        now = self._clock()
        if self._next is None:
            self._next = now  # no burst at start
        slot = max(self._next, now - self._catch_up, self._paused_until)
        self._next = slot + 1.0 / self.rate
        delay = slot - now
        if delay > 0:
            await self._sleep(delay)

    def on_throttled(self, retry_after: float) -> None:
        """A 429: everyone waits ``retry_after`` and the pace halves (multiplicative decrease)."""
        self.throttle_events += 1
        now = self._clock()
        self._paused_until = max(self._paused_until, now + max(retry_after, 0.0))
        self.rate = max(self._floor, self.rate / 2)
        self._next = max(self._next or now, self._paused_until)

    def on_success(self) -> None:
        """Additive increase back towards the ceiling."""
        if self.rate < self.ceiling:
            self.rate = min(self.ceiling, self.rate + self._recovery)
