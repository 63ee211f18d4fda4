"""WatchStatus's initial state, read a page at a time as the client takes it: what a stream
holds does not grow with the items, and changes made while it is read are neither lost nor
sent twice (10 unread watchers of 200,000 jobs used to hold 89 MiB each)."""

from __future__ import annotations

from dataclasses import replace

from analysis_service.domain.hub import StatusHub
from analysis_service.domain.models import Bookmark, JobStatus, StatusEvent
from analysis_service.domain.watch import STATE_PAGE, StatusWatcher, WatchRequest
from analysis_service.storage.memory_store import MemoryQueueStore
from tests.queue_support import spec


async def test_the_initial_state_is_read_as_it_is_taken_and_changes_meanwhile_come_once() -> None:
    hub = StatusHub(buffer_size=100, max_watchers=10)
    store = MemoryQueueStore(publish=hub.publish)
    watcher = StatusWatcher(store, hub, bookmark_interval=60.0)
    # Two pages of items; the first of the second page is the one a worker claims first.
    await store.submit(
        [spec(n, priority=1 if n == STATE_PAGE else 0) for n in range(2 * STATE_PAGE)],
        max_attempts=3,
    )
    snapshot_revision = 2 * STATE_PAGE
    first_of_second_page = spec(STATE_PAGE).media_id

    async with watcher.watch(WatchRequest(send_initial_state=True)) as stream:
        items = aiter(stream)
        first_page = [await anext(items) for _ in range(STATE_PAGE)]
        # The client has taken the first page: the second is not read yet. Meanwhile an item
        # of it changes, an item is created in it, and another before it (in a page read).
        [claimed] = await store.claim("worker", 1, 60.0)
        assert claimed.spec.media_id == first_of_second_page
        created_ahead = replace(spec(5000), media_id=first_of_second_page + "b")
        created_behind = replace(spec(5001), media_id=spec(0).media_id + "b")
        await store.submit([created_ahead], max_attempts=3)
        await store.submit([created_behind], max_attempts=3)
        rest: list[StatusEvent | Bookmark] = []
        while not (rest and isinstance(rest[-1], Bookmark)):
            rest.append(await anext(items))
        # A change after the initial state, of an item sent in the first page.
        [next_claimed] = await store.claim("worker", 1, 60.0)
        live = [await anext(items) for _ in range(4)]

    *second_page, end = rest
    assert end == Bookmark(snapshot_revision, initial_state_end=True)
    sent = [item for item in [*first_page, *second_page] if isinstance(item, StatusEvent)]
    assert len(sent) == len(first_page) + len(second_page)
    assert all(state.initial_state for state in sent)
    # Each item once, by media id, as of the snapshot: the item that changed before its page
    # was read (so the page was read only then), and the one created in that page, are left
    # out; nothing is newer than the bookmark, from which a client may resume.
    expected_ids = sorted(
        spec(n).media_id for n in range(2 * STATE_PAGE) if spec(n).media_id != first_of_second_page
    )
    assert [state.media_id for state in sent] == expected_ids
    assert all(state.revision <= snapshot_revision for state in sent)
    # Then every change after the snapshot once, in order, those of the items left out too.
    assert [
        (event.revision, event.media_id, event.status)
        for event in live
        if isinstance(event, StatusEvent)
    ] == [
        (snapshot_revision + 1, first_of_second_page, JobStatus.PROCESSING),
        (snapshot_revision + 2, created_ahead.media_id, JobStatus.PENDING),
        (snapshot_revision + 3, created_behind.media_id, JobStatus.PENDING),
        (snapshot_revision + 4, next_claimed.spec.media_id, JobStatus.PROCESSING),
    ]
