"""Lines a client can make the services write come at most once per kind and interval, and
the next one counts those left out (mediatag_common.log_limits), on a fake clock."""

from __future__ import annotations

import logging

import pytest

from mediatag_common.log_limits import RateLimitedLog


def test_one_line_per_key_and_interval_and_the_next_counts_those_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    log = RateLimitedLog(logging.getLogger("tests.log_limits"), 10.0, clock=lambda: now[0])
    for _ in range(5):
        log.warning("SERVER_BUSY", "busy: %s", "room")
    log.warning("TOO_MANY_CALLS", "calls")
    now[0] += 9.9
    log.warning("SERVER_BUSY", "busy: %s", "room")
    now[0] += 0.1
    log.warning("SERVER_BUSY", "busy: %s", "room")
    log.warning("SERVER_BUSY", "busy: %s", "room")
    now[0] += 10.0
    log.warning("SERVER_BUSY", "busy: %s", "room")
    assert [r.getMessage() for r in caplog.records] == [
        "busy: room",
        "calls",
        "busy: room (5 more since the last such line)",
        "busy: room (1 more since the last such line)",
    ]
    assert {r.levelno for r in caplog.records} == {logging.WARNING}
