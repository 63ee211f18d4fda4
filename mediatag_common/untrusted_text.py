"""Text from clients that others will read: what it may not contain, and how it is shown.

Control characters (C0, DEL and C1) start terminal escapes — ``ESC [`` and the one-character
CSI, U+009B — so a filename could clear or recolour the screen of whoever lists it; the
bidirectional overrides and isolates (U+202A to U+202E, U+2066 to U+2069) reorder what a reader
sees (``gpj.exe`` shown for ``exe.jpg``). The joiners that emoji and Persian names need
(U+200C, U+200D) are ordinary text.

Where the README says "no control characters", these are refused; elsewhere (context values,
and anything shown that came from a server) they are shown as ``\\uXXXX`` escapes, which are
also valid in JSON strings.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def has_unsafe_characters(text: str) -> bool:
    """Whether ``text`` holds a control character or a bidirectional override or isolate."""
    return _UNSAFE.search(text) is not None


def escaped(text: str, keep: str = "") -> str:
    """``text`` with each unsafe character but those in ``keep`` (say ``"\\n"``) written as
    ``\\uXXXX``."""
    return _UNSAFE.sub(
        lambda found: found[0] if found[0] in keep else f"\\u{ord(found[0]):04x}", text
    )
