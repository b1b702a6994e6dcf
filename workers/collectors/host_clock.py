"""Host clock: the time the sample was taken."""

from __future__ import annotations

import time

from vhostmd.workers.collectors.source import MetricSpec, Request, Sample, Source


def collect(request: Request) -> Sample:
    return Sample(host={"Time": str(int(time.time()))})


SOURCE = Source(
    name="host_clock",
    kind="host",
    metrics=(
        MetricSpec("Time", "uint64", "host", "s",
                   "time(2): seconds since the Unix epoch when the cycle sampled"),
    ),
    collect=collect,
)
