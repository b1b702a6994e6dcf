"""Extra cycles on libvirt lifecycle events, between the regular ones.

The events child (``vhostmd.workers.events``) sends DomainsChanged when a
domain starts or stops. The supervisor then runs a cycle at once if none is
running, or right after the running one, so a new VM is served and a stopped
one leaves the document within a second instead of one update period.

Extra cycles never move the regular schedule (``CycleClock``): they do not
advance it, and each ends by the next regular start at the latest. They are
rate-limited: at most one extra cycle per ``MIN_GAP`` seconds, and none when
the next regular cycle is due within ``MIN_GAP`` anyway (it lists the domains
too), so an event storm (a host booting 500 VMs) costs at most 2 extra cycles
a second. A regular cycle does not hold back an extra one: an event just
after a regular cycle is served at once.

Whether events are being received at all is kept here too, for the status
file and the health textfile; without events nothing changes but latency.
"""

from __future__ import annotations

import math

MIN_GAP = 0.5


class InstantCycles:
    def __init__(self, min_gap: float = MIN_GAP) -> None:
        self.min_gap = min_gap
        self.wanted = False  # an event came after the last cycle started
        self.last_extra = -math.inf  # when the last extra cycle started
        self.extra_cycle: int | None = None  # number of the running extra cycle
        self.extra_total = 0
        self.events_total = 0
        self.connected = False
        self.detail = "starting"

    def request(self) -> None:
        """A domain started or stopped: list again soon."""
        self.wanted = True
        self.events_total += 1

    def due(self, now: float, next_regular: float) -> bool:
        """Should an extra cycle start now (none is running)?"""
        return (self.wanted and now >= self.last_extra + self.min_gap
                and next_regular - now >= self.min_gap)

    def wake(self, until: float) -> float:
        """When the loop must wake, given it would wake at ``until`` for the schedule."""
        if not self.wanted:
            return until
        return min(until, self.last_extra + self.min_gap)

    def deadline(self, deadline: float, next_regular: float) -> float:
        """An extra cycle's deadline: its usual one, but not past the next regular start."""
        return min(deadline, next_regular)

    def started(self, number: int, now: float, extra: bool) -> None:
        """A cycle started: it lists the domains, so it answers every event so far."""
        self.wanted = False
        if extra:
            self.last_extra = now
            self.extra_cycle = number
            self.extra_total += 1

    def is_extra(self, number: int) -> bool:
        return self.extra_cycle == number

    def state(self, connected: bool, detail: str) -> None:
        self.connected = connected
        self.detail = detail

    def describe(self) -> str:
        """For the status file: the events child's state."""
        return "watching" if self.connected else f"no events: {self.detail}"
