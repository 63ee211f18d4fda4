"""Seconds (as ``time.time()`` gives them) as protobuf's Timestamp and Duration."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """The Timestamp of a Unix time in seconds; None (the field stays unset) for None."""
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    """The Duration of a length in seconds; None (the field stays unset) for None."""
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value
