"""The CLI's status board: what `upload --watch` and `watch` show as changes arrive."""

from __future__ import annotations

import io
import re

import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb

from mediatag_cli import progress
from mediatag_cli.progress import Display, StatusBoard


def change(media_id: str, status: int, attempt: int = 1, *tags: str) -> apb.StatusChange:
    return apb.StatusChange(
        media_id=media_id,
        status=status,  # type: ignore[arg-type]
        attempt=attempt,
        result=apb.AnalysisResult(tags=list(tags)) if tags else None,
    )


def screen(out: io.StringIO) -> list[str]:
    """The lines of the last redraw (each redraw starts by moving the cursor up)."""
    last = re.split(r"\x1b\[\d+F", out.getvalue())[-1]
    return [line.replace("\x1b[2K", "") for line in last.split("\n") if line]


def test_an_upload_board_follows_only_its_items_and_prints_a_line_per_change() -> None:
    out = io.StringIO()
    items = [
        ipb.Media(id="a", filename="a.jpg", status=ipb.PROCESSING_STATUS_PENDING),
        ipb.Media(id="b", filename="b.jpg", status=ipb.PROCESSING_STATUS_PENDING),
    ]
    board = StatusBoard(out, Display.LINES, items)
    board.update(change("a", apb.PROCESSING_STATUS_PROCESSING))
    board.update(change("elsewhere", apb.PROCESSING_STATUS_PROCESSING))
    board.update(change("a", apb.PROCESSING_STATUS_COMPLETED, 1, "dominant-red"))
    assert not board.done
    board.update(change("b", apb.PROCESSING_STATUS_FAILED))
    board.finish()

    assert board.done
    assert board.failed
    assert out.getvalue().splitlines() == [
        "a.jpg (a) pending -> processing attempt 1",
        "a.jpg (a) processing -> completed attempt 1 tags: dominant-red",
        "b.jpg (b) pending -> failed attempt 1",
        "2/2 done: 1 completed, 1 failed",
    ]


def test_a_watch_board_takes_in_new_items_and_shows_the_latest_that_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LINES", "4")  # room for 2 items and the counts line
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    board = StatusBoard(out, Display.LIVE)
    for media_id in ("m1", "m2", "m3"):
        board.update(change(media_id, apb.PROCESSING_STATUS_PENDING, 0))
    board.update(change("m1", apb.PROCESSING_STATUS_COMPLETED, 1, "size-small"))

    lines = screen(out)
    # m1 changed last, so it is drawn last; m2 scrolled off; the counts cover all three.
    assert [line.split()[0] for line in lines[:-1]] == ["m3", "m1"]
    assert "completed" in lines[1]
    assert "size-small" in lines[1]
    assert lines[-1] == "1/3 done: 2 pending, 1 completed"


def test_an_endless_watch_forgets_finished_items_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "MAX_TRACKED_ITEMS", 3)
    board = StatusBoard(io.StringIO(), Display.NONE)
    board.update(change("old-pending", apb.PROCESSING_STATUS_PENDING, 0))
    board.update(change("finished", apb.PROCESSING_STATUS_COMPLETED))
    board.update(change("new1", apb.PROCESSING_STATUS_PENDING, 0))
    board.update(change("new2", apb.PROCESSING_STATUS_PENDING, 0))

    assert sorted(board.unfinished_ids) == ["new1", "new2", "old-pending"]
    assert not board.done
