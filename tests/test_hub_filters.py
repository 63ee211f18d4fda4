"""What each watcher is offered: exactly the events its filter selects, in commit order,
whether other watchers share its filter (one selection per filter and commit) or not."""

from __future__ import annotations

from analysis_service.domain.hub import StatusHub, Subscription, WatchFilter
from analysis_service.domain.models import JobStatus, StatusEvent


def event(revision: int, media_id: str, owner_id: str) -> StatusEvent:
    return StatusEvent(
        revision=revision,
        media_id=media_id,
        owner_id=owner_id,
        status=JobStatus.PROCESSING,
        previous_status=JobStatus.PENDING,
        attempt=1,
        event_time=0.0,
    )


async def offered(watcher: Subscription) -> list[int]:
    revisions = []
    while (taken := await watcher.next(0)) is not None:
        revisions.append(taken.revision)
    return revisions


async def test_every_watcher_gets_what_its_filter_selects_shared_or_not() -> None:
    filters = {
        "everything": WatchFilter(),
        "owner a": WatchFilter(owner_id="a"),
        "owner b": WatchFilter(owner_id="b"),
        "a token of owners a and c": WatchFilter(allowed_owners=frozenset({"a", "c"})),
        "two ids": WatchFilter(media_ids=frozenset({"m2", "m5"})),
        "an id of owner b": WatchFilter(media_ids=frozenset({"m2", "m3"}), owner_id="b"),
    }
    hub = StatusHub(buffer_size=100, max_watchers=100)
    # Two watchers per filter, each pair subscribed with equal, distinct filter objects.
    watchers = {
        name: [hub.subscribe(WatchFilter(f.media_ids, f.owner_id, f.allowed_owners)) for _ in "xy"]
        for name, f in filters.items()
    }
    commits = [
        [event(1, "m1", "a"), event(2, "m2", "b"), event(3, "m3", "c")],
        [event(4, "m4", "b")],
        [event(5, "m5", "a"), event(6, "m3", "b")],
    ]
    for commit in commits:
        hub.publish(commit)

    expected = {
        "everything": [1, 2, 3, 4, 5, 6],
        "owner a": [1, 5],
        "owner b": [2, 4, 6],
        "a token of owners a and c": [1, 3, 5],
        "two ids": [2, 5],
        "an id of owner b": [2, 6],
    }
    for name, pair in watchers.items():
        for watcher in pair:
            assert await offered(watcher) == expected[name], name
