"""Browser sessions: a token given once, kept by the gateway, named by an HttpOnly cookie.

``EventSource`` cannot send an ``Authorization`` header, so the page trades its token for a
session. Sessions live in memory only (a restart of the gateway asks for the token again);
each principal holds a bounded number, the least recently used ending first, and a session
unused for ``idle_timeout`` ends. Session ids are looked up by their SHA-256, so the time a
lookup takes says nothing about the ids that exist.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from web_gateway.config import SessionConfig

if TYPE_CHECKING:
    from mediatag_common.auth import Principal


@dataclass
class Session:
    """One signed-in browser: who it is, the token its calls carry, its CSRF token."""

    principal: Principal
    token: str = field(repr=False)
    csrf_token: str = field(repr=False)
    last_used: float


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class SessionStore:
    """The open sessions, by id."""

    def __init__(self, config: SessionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._sessions: dict[bytes, Session] = {}
        # Each principal's session keys, least recently used first.
        self._by_principal: dict[str, collections.OrderedDict[bytes, None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal, token: str) -> tuple[str, Session]:
        """A new session of ``principal``; its id (for the cookie) and the session."""
        session_id = secrets.token_urlsafe(32)
        key = _key(session_id)
        session = Session(principal, token, secrets.token_urlsafe(32), self._clock())
        own = self._by_principal.setdefault(principal.name, collections.OrderedDict())
        self._expire(own)
        while len(own) >= self._config.max_per_principal:
            oldest, _ = own.popitem(last=False)
            del self._sessions[oldest]
        self._sessions[key] = session
        own[key] = None
        return session_id, session

    def get(self, session_id: str) -> Session | None:
        """The session of ``session_id`` if it is open (using it keeps it open)."""
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_used > self._config.idle_timeout:
            self._remove(key, session)
            return None
        session.last_used = now
        self._by_principal[session.principal.name].move_to_end(key)
        return session

    def delete(self, session_id: str) -> None:
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is not None:
            self._remove(key, session)

    def _remove(self, key: bytes, session: Session) -> None:
        del self._sessions[key]
        own = self._by_principal[session.principal.name]
        del own[key]
        if not own:
            del self._by_principal[session.principal.name]

    def _expire(self, own: collections.OrderedDict[bytes, None]) -> None:
        """End the idle sessions among ``own`` (least recently used first)."""
        now = self._clock()
        while own:
            key = next(iter(own))
            if now - self._sessions[key].last_used <= self._config.idle_timeout:
                return
            del own[key]
            del self._sessions[key]
