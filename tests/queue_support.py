"""What the queue's tests share: jobs to submit, and a clock that follows the event loop.

With ``pytest.mark.looptime`` (the looptime plugin) the event loop's time is fake: sleeps and
timeouts return at once while the loop's clock moves on by exactly their length. A
:class:`LoopClock` gives the domain and the in-memory store that same time, so one fake clock
drives the queue's rules, the workers' waits and the store's lease expiry and due times.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from analysis_service.domain.models import JobSpec
from analysis_service.errors import ContentUnavailable

# Where the loop clock's epoch readings start: a fixed instant, not zero (zero reads as "unset"
# in places), and small enough that a float near it resolves far below looptime's microsecond
# ticks (near today's 1.7e9 a float's step is 0.24 µs): instants computed from it, such as a
# pause's end or a due time, fall on the loop's ticks exactly and compare equal.
EPOCH = 1_000_000.0


class LoopClock:
    """The running event loop's clock, as the domain's Clock; made in a test whose loop time
    looptime fakes (elsewhere its waits would take real time, so it refuses)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        assert getattr(loop, "looptime_on", False), "mark the test with pytest.mark.looptime"

    def time(self) -> float:
        return EPOCH + self.monotonic()

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()


def content(number: int) -> bytes:
    """The bytes of media ``number`` (what a ContentSource would read)."""
    return f"media-{number:04d}".encode()


def spec(number: int, *, priority: int = 0) -> JobSpec:
    data = content(number)
    return JobSpec(
        media_id=data.decode(),
        owner_id="owner",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        content_type="image/jpeg",
        content_ref=data.decode(),
        priority=priority,
    )


@dataclass
class Ingest:
    """The ingest service as the workers read bytes from it: unreachable for a media id's
    next ``outages`` reads (or ``always``), else the bytes its spec names. Each read is
    recorded with the loop's time."""

    outages: dict[str, int] = field(default_factory=dict)
    always: bool = False
    reads: list[tuple[str, float]] = field(default_factory=list)

    @property
    def read_ids(self) -> list[str]:
        """The media ids read, in order (once per read)."""
        return [media_id for media_id, _ in self.reads]

    async def read(self, job: JobSpec) -> bytes:
        self.reads.append((job.media_id, asyncio.get_running_loop().time()))
        if self.always or self.outages.get(job.media_id, 0) > 0:
            self.outages[job.media_id] = self.outages.get(job.media_id, 0) - 1
            raise ContentUnavailable("ingest unreachable")
        return job.content_ref.encode()
