"""Several broker nodes: which URL to connect to next, and how long to wait before trying.

aio-pika connects to one host (its multi-host issue has been open since 2018), so the app keeps
the cluster's URLs in a `HostCycle` and its robust connection asks it for the next one each time
a node fails: at start (each URL once, until one answers) and on every reconnect. A node that
died is left for the next at once: the first reconnect attempt goes to the next URL without a
pause, and each further URL not yet tried since the last success gets only a short one. Once
every URL has failed in a row, the pauses back off exponentially with jitter (0.5 s doubling up
to 5 s), so a fleet of clients whose whole cluster restarts does not knock on it in step.

Strategies, after kombu's `failover_strategy`: `order` (the URLs as given, so every client
prefers the first node and moves on only when it fails) and `shuffle` (a new random order each
round, which spreads clients over the nodes). Neither moves a client back when a node returns:
a client stays where it is connected until that node fails.

Pure: the clock and the random numbers come from the caller.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from enum import StrEnum

from amqtask._startup import Backoff

# Before trying a URL not tried since the last success: long enough to let the event loop run.
NEXT_URL_PAUSE = 0.05

# Once every URL failed in a row: a restarting node is back in seconds, so look often.
RECONNECT_BACKOFF = Backoff(first=0.5, cap=5.0)


class Failover(StrEnum):
    """In which order the app tries the broker URLs, at start and on each reconnect."""

    ORDER = "order"  # as given: the first that answers, then each next one when a node fails
    SHUFFLE = "shuffle"  # a random order each round: spreads clients over the nodes


class HostCycle:
    """The URLs of one broker (a cluster's nodes), the one to connect to now, and the pause
    before the next attempt.

    `failed()` is called for every failed attempt and every lost connection, `connected()` once
    an attempt succeeded.
    """

    def __init__(
        self,
        urls: Sequence[str],
        failover: Failover | str = Failover.ORDER,
        *,
        backoff: Backoff = RECONNECT_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not urls:
            raise ValueError("no broker URL given")
        self.urls = tuple(urls)
        self.failover = Failover(failover)
        self.backoff = backoff
        self._rand = rand
        self._order = self._new_order(avoid=None)
        self._position = 0
        self._failures = 0  # consecutive failed attempts (and lost connections)
        #: Seconds to wait before the next attempt.
        self.pause = 0.0

    @property
    def current(self) -> str:
        """The URL to connect to now."""
        return self.urls[self._order[self._position]]

    @property
    def failures(self) -> int:
        """Failed attempts in a row since the last success."""
        return self._failures

    def round(self) -> list[str]:
        """Every URL once, the current one first, in the order they will be tried."""
        count = len(self._order)
        return [self.urls[self._order[(self._position + i) % count]] for i in range(count)]

    def start_at(self, url: str) -> None:
        """Make `url` (one of `urls`) the current one, keeping the order."""
        self._position = [self.urls[i] for i in self._order].index(url)

    def failed(self) -> float:
        """The current URL failed (refused, timed out, or its connection was lost): move on.

        Returns the pause before the next attempt, also kept in `pause`.
        """
        self._failures += 1
        failed = self._order[self._position]
        self._position += 1
        if self._position == len(self._order):
            self._position = 0
            if self.failover is Failover.SHUFFLE:
                self._order = self._new_order(avoid=failed)
        untried = self._failures < len(self.urls)
        if untried:
            self.pause = NEXT_URL_PAUSE
        else:
            self.pause = self.backoff.delay(self._failures - len(self.urls) + 1, self._rand())
        return self.pause

    def connected(self) -> None:
        """An attempt succeeded: the next failure starts a fresh round."""
        self._failures = 0
        self.pause = NEXT_URL_PAUSE

    def _new_order(self, avoid: int | None) -> list[int]:
        order = list(range(len(self.urls)))
        if self.failover is Failover.SHUFFLE:
            # Fisher-Yates with our own random numbers, so tests can fix them.
            for i in reversed(range(1, len(order))):
                j = min(int(self._rand() * (i + 1)), i)
                order[i], order[j] = order[j], order[i]
            if avoid is not None and len(order) > 1 and order[0] == avoid:
                order[0], order[1] = order[1], order[0]  # not the node that just failed again
        return order
