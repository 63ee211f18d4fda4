"""A status board of items under analysis: ``upload --watch`` and ``watch`` show it.

On a terminal it is redrawn in place: one line per item and the counts at the bottom. Into a
pipe or file it prints one line per change instead, since cursor movement would be noise.
"""

from __future__ import annotations

import shutil
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TextIO

from mediatag.analysis.v1 import analysis_pb2
from mediatag.ingest.v1 import ingest_pb2

from mediatag_cli.render import STATUS_VALUES, TERMINAL_STATUSES, change_outcome, status_name
from mediatag_common.untrusted_text import escaped

_CURSOR_UP_LINES = "\x1b[{}F"  # to the start of the line N lines up
_CLEAR_LINE = "\x1b[2K"


class Display(Enum):
    """How progress is shown: redrawn in place, a line per change, or not at all (JSON)."""

    LIVE = "live"
    LINES = "lines"
    NONE = "none"


@dataclass
class _Item:
    media_id: str
    filename: str
    status: int
    attempt: int = 0
    outcome: str = ""


# An endless ``watch`` of everything sees ever more items: it keeps this many, dropping the
# longest-finished first, and draws only as many as fit on the screen.
MAX_TRACKED_ITEMS = 10_000


class StatusBoard:
    """Tracks items from their status changes and shows them.

    Started with ``items`` it follows exactly those (an upload); started empty, it takes in
    every item a change names (a watch).
    """

    def __init__(
        self, out: TextIO, display: Display, items: Sequence[ingest_pb2.Media] = ()
    ) -> None:
        self._items: OrderedDict[str, _Item] = OrderedDict(
            (media.id, _Item(media.id, media.filename, media.status, media.attempt))
            for media in items
        )
        self._follow_new = not items
        self._out = out
        self._display = display
        self._notice = ""
        self._lines_drawn = 0
        self._draw()

    @property
    def done(self) -> bool:
        return all(item.status in TERMINAL_STATUSES for item in self._items.values())

    @property
    def failed(self) -> bool:
        return any(
            item.status == ingest_pb2.PROCESSING_STATUS_FAILED for item in self._items.values()
        )

    @property
    def unfinished_ids(self) -> list[str]:
        return [
            item.media_id for item in self._items.values() if item.status not in TERMINAL_STATUSES
        ]

    def update(self, change: analysis_pb2.StatusChange) -> None:
        """Apply one status change (ignored when it is not about an item followed)."""
        item = self._items.get(change.media_id)
        if item is None and self._follow_new:
            item = self._items[change.media_id] = _Item(change.media_id, change.media_id, 0)
            self._forget_oldest()
        if item is None or (item.status, item.attempt) == (change.status, change.attempt):
            return
        previous = item.status
        item.status = change.status
        item.attempt = change.attempt
        item.outcome = change_outcome(change).strip()
        if self._follow_new:
            self._items.move_to_end(item.media_id)  # most recently changed at the bottom
        self._notice = ""
        if self._display is Display.LINES:
            label = (
                item.filename
                if item.filename == item.media_id
                else (f"{item.filename} ({item.media_id})")
            )
            self._print(
                f"{label} {status_name(previous)} -> "
                f"{status_name(item.status)} attempt {item.attempt} {item.outcome}".rstrip()
            )
        self._draw()

    def _forget_oldest(self) -> None:
        while len(self._items) > MAX_TRACKED_ITEMS:
            oldest = next(
                (key for key, item in self._items.items() if item.status in TERMINAL_STATUSES),
                next(iter(self._items)),
            )
            del self._items[oldest]

    def notice(self, text: str) -> None:
        """Show a passing remark, e.g. that the watch is reconnecting."""
        self._notice = text
        if self._display is Display.LINES:
            self._print(text)
        self._draw()

    def finish(self) -> None:
        """Print the final counts (the live display already shows them)."""
        if self._display is Display.LINES:
            self._print(self._summary())

    def _summary(self) -> str:
        counts = Counter(item.status for item in self._items.values())
        parts = [
            f"{counts[value]} {name}" for name, value in STATUS_VALUES.items() if counts[value]
        ]
        finished = sum(counts[status] for status in TERMINAL_STATUSES)
        return f"{finished}/{len(self._items)} done: " + ", ".join(parts)

    def _draw(self) -> None:
        if self._display is not Display.LIVE:
            return
        # The most recent items that fit above the counts line.
        shown = list(self._items.values())[-max(1, shutil.get_terminal_size().lines - 2) :]
        name_width = min(40, max((len(item.filename) for item in shown), default=0))
        lines = [
            f"  {item.filename[:name_width]:<{name_width}}  {status_name(item.status):<10} "
            f"attempt {item.attempt}  {item.outcome}"
            for item in shown
        ]
        lines.append(self._summary() + (f"  ({self._notice})" if self._notice else ""))
        self._lines_drawn = redraw(self._out, lines, self._lines_drawn)

    def _print(self, line: str) -> None:
        self._out.write(escaped(line) + "\n")
        self._out.flush()


def redraw(out: TextIO, lines: Sequence[str], lines_drawn: int) -> int:
    """Draw ``lines`` over the ``lines_drawn`` drawn before; returns how many it drew.

    Lines are cut to the terminal width: a wrapped line would throw the next redraw off.
    """
    width = max(20, shutil.get_terminal_size().columns - 1)
    up = _CURSOR_UP_LINES.format(lines_drawn) if lines_drawn else ""
    # The lines hold untrusted text: escaped, then framed by the display's own controls.
    out.write(up + "".join(f"{_CLEAR_LINE}{escaped(line.rstrip())[:width]}\n" for line in lines))
    out.flush()
    return len(lines)
