"""The web gateway's own rules, fast: sessions and the throughput count."""

from __future__ import annotations

import pytest

from mediatag_common.auth import Principal
from web_gateway.config import SessionConfig
from web_gateway.domain.events import Change
from web_gateway.domain.sessions import SessionStore
from web_gateway.domain.throughput import MINUTE, Throughput


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(name: str) -> Principal:
    return Principal(name, frozenset({"viewer"}))


def test_a_session_ends_when_unused_too_long_and_use_keeps_it() -> None:
    clock = Clock()
    store = SessionStore(SessionConfig(idle_timeout=60.0), clock)
    kept, _ = store.create(principal("a"), "token-a")
    dropped, _ = store.create(principal("a"), "token-a")
    clock.now += 50
    assert store.get(kept) is not None
    clock.now += 50
    assert store.get(dropped) is None
    session = store.get(kept)
    assert session is not None
    assert session.token == "token-a"
    assert store.get("not-a-session") is None


def test_a_principal_holds_a_bounded_number_of_sessions_the_least_used_ending_first() -> None:
    clock = Clock()
    store = SessionStore(SessionConfig(max_per_principal=2), clock)
    first, _ = store.create(principal("a"), "t")
    second, _ = store.create(principal("a"), "t")
    other, _ = store.create(principal("b"), "t")
    clock.now += 1
    assert store.get(first) is not None  # now the most recently used
    third, _ = store.create(principal("a"), "t")
    assert store.get(second) is None
    assert all(store.get(kept) is not None for kept in (first, third, other))
    assert len(store) == 3
    store.delete(first)
    assert store.get(first) is None
    assert len(store) == 2


def change(status: str, at: float, revision: int = 1) -> Change:
    return Change(revision, "owner", "media", status, at, b"{}")


@pytest.mark.parametrize("minutes", [60])
def test_throughput_counts_terminal_changes_by_minute_for_the_last_hour(minutes: int) -> None:
    clock = Clock(100 * MINUTE + 30)
    counted = Throughput(minutes, clock)
    counted.record(change("COMPLETED", 100 * MINUTE + 1))
    counted.record(change("COMPLETED", 100 * MINUTE + 2))
    counted.record(change("FAILED", 99 * MINUTE + 59))
    counted.record(change("PROCESSING", 100 * MINUTE + 3))
    counted.record(change("COMPLETED", 30 * MINUTE))  # more than an hour ago
    last_hour = counted.last_hour()
    assert len(last_hour) == minutes
    assert last_hour[-1].start == 100 * MINUTE
    assert (last_hour[-1].completed, last_hour[-1].failed) == (2, 0)
    assert (last_hour[-2].completed, last_hour[-2].failed) == (0, 1)
    assert sum(m.completed + m.failed for m in last_hour) == 3
    clock.now += 60 * MINUTE
    assert sum(m.completed + m.failed for m in counted.last_hour()) == 0
