"""The daemon's own event-loop lag: how late a periodic timer fires.

Everything the daemon does for every user (logins, attaches, the poller) runs on one
event loop, so anything that blocks it — a slow read, a big parse, a long callback —
delays all users at once. A timer asked to fire every :data:`INTERVAL` seconds fires
late by exactly as long as the loop was busy with something else; that lateness is
what this module measures. It keeps the last :data:`WINDOW` samples (5 minutes) for
the metrics' p50/p99/max (``sbroker_event_loop_lag_seconds``) and logs a warning for
every tick later than :data:`WARN_AFTER`.

It observes only: it never changes what the daemon does.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from . import log as _log

INTERVAL = 0.1
WARN_AFTER = 0.25
WINDOW = 3000
#: Upper bounds (seconds) of the cumulative lateness histogram, kept since start so a reader
#: can difference two scrapes and get the distribution of exactly that interval.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class LagSummary:
    """Lateness in seconds over the recent window; ``late`` counts ticks over the warning bound."""

    p50: float
    p99: float
    max: float
    ticks: int
    late: int


class LoopLag:
    def __init__(self, interval: float = INTERVAL, warn_after: float = WARN_AFTER, window: int = WINDOW) -> None:
        self.interval = interval
        self.warn_after = warn_after
        self.samples: collections.deque[float] = collections.deque(maxlen=window)
        self.ticks = 0
        self.late = 0
        #: Ticks at most BUCKETS[i] late, since start (the last slot: all ticks), and their sum.
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.log = _log.get("sbroker.looplag")

    async def run(self) -> None:
        """Tick forever on the running loop (cancel the task to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            self.observe(loop.time() - start - self.interval)

    def observe(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.samples.append(lag)
        self.ticks += 1
        self.total += lag
        for i, bound in enumerate(BUCKETS):
            if lag <= bound:
                self.buckets[i] += 1
        self.buckets[-1] += 1
        if lag > self.warn_after:
            self.late += 1
            self.log.warning("event_loop_lag", lag_ms=round(lag * 1000, 1), threshold_ms=round(self.warn_after * 1000))

    def summary(self) -> LagSummary:
        ordered = sorted(self.samples)
        return LagSummary(p50=_rank(ordered, 0.5), p99=_rank(ordered, 0.99), max=ordered[-1] if ordered else 0.0,
                          ticks=self.ticks, late=self.late)


def _rank(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted samples (0.0 when there are none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]
