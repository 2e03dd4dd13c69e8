"""The shared limiter: paces under the ceiling, never bursts past a one-second window, backs off on 429 (AIMD)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from d365_migration._ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def _run(limiter: RateLimiter, clock: FakeClock, n: int, jitter: list[float] | None = None) -> list[float]:
    times: list[float] = []

    async def go() -> None:
        for i in range(n):
            await limiter.acquire()
            times.append(clock.now)
            if jitter:
                clock.now += jitter[i % len(jitter)]  # the caller is late getting back (a busy loop)

    asyncio.run(go())
    return times


def _max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_paces_at_95_percent_of_the_limit() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock, sleep=clock.sleep)
    times = _run(limiter, clock, 3000)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 0.94 * 100 <= rate <= 0.951 * 100


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=0.03), min_size=1, max_size=20),
       st.sampled_from([500, 6000, 12000]))
def test_never_exceeds_the_limit_in_any_second_or_minute_even_when_callers_are_late(jitter: list[float],
                                                                                   rpm: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm, clock=clock, sleep=clock.sleep)
    times = _run(limiter, clock, min(3000, rpm), jitter)
    assert _max_in_window(times, 60.0) <= rpm
    assert _max_in_window(times, 1.0) <= max(1, rpm // 60)


def test_late_callers_catch_up_a_little() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6000, clock=clock, sleep=clock.sleep)
    times = _run(limiter, clock, 2000, jitter=[0.0, 0.0, 0.02])  # every third request comes back 20 ms late
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate >= 0.85 * 100  # without catch-up the lateness would be lost for good (about 0.6 of the limit)


def test_throttle_pauses_everyone_and_halves_then_recovers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock, sleep=clock.sleep)
    _run(limiter, clock, 5)
    before = limiter.rate
    limiter.on_throttled(10.0)
    assert limiter.rate == before / 2
    start = clock.now
    _run(limiter, clock, 1)
    assert clock.now >= start + 10.0  # waited out Retry-After
    for _ in range(200):
        limiter.on_success()
    assert limiter.rate == limiter.ceiling  # additive increase back to the ceiling, never above
