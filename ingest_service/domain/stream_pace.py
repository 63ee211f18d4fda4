"""How long a streamed upload may take over its bytes: the rules of its receiving loop.

A stream is ended when its client sends nothing for ``idle_timeout`` seconds
(``UPLOAD_STALLED``), and when it brings less than ``min_rate`` bytes per second over a
window of ``rate_window`` seconds (``UPLOAD_TOO_SLOW``): without the second rule a client
sending a byte now and then kept a stream, its temp file and its descriptor for as long as it
liked. Windows follow each other from the start of the stream; a window that brought its
quota does not lend its surplus to the next, so a fast start buys no later dripping.
"""

from __future__ import annotations

from ingest_service.config import StreamLimits
from ingest_service.errors import IngestError, UploadStalled, UploadTooSlow


class StreamPace:
    """One stream's progress against the limits; times are any monotonic clock's seconds."""

    def __init__(self, limits: StreamLimits, now: float) -> None:
        self._limits = limits
        self._quota = limits.min_rate * limits.rate_window
        self._last_message = now
        self._window_start = now
        self._window_bytes = 0

    def deadline(self) -> float:
        """When the stream breaks a rule unless more comes before."""
        window = self._limits.rate_window
        # A window that already brought its quota is done: the next one's end counts.
        windows = 2 if self._window_bytes >= self._quota else 1
        return min(
            self._last_message + self._limits.idle_timeout, self._window_start + windows * window
        )

    def received(self, size: int, now: float) -> None:
        """A message of ``size`` content bytes came at ``now``; raises if it came too late."""
        self._close_windows(now)
        self._window_bytes += size
        self._last_message = now

    def refusal(self, now: float) -> IngestError:
        """Why the stream is ended at ``now``, its deadline, with nothing more received."""
        idle = self._limits.idle_timeout
        if now - self._last_message >= idle:
            return UploadStalled(f"nothing received for {idle:g} s; the partial upload was removed")
        return self._too_slow()

    def _close_windows(self, now: float) -> None:
        window = self._limits.rate_window
        while now >= self._window_start + window:
            if self._window_bytes < self._quota:
                raise self._too_slow()
            self._window_start += window
            self._window_bytes = 0

    def _too_slow(self) -> UploadTooSlow:
        limits = self._limits
        return UploadTooSlow(
            f"less than {limits.min_rate} bytes per second over {limits.rate_window:g} s; "
            "the partial upload was removed",
            metadata={"minBytesPerSecond": str(limits.min_rate)},
        )
