"""Who is calling, for the shares of slots (watchers, upload streams) one caller may hold.

Pure data, so that the domain may key what it hands out by caller without knowing gRPC or
tokens; :func:`mediatag_common.auth.scope.current_caller` says who the current call's is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """A principal's name, or without authentication a peer's address (no port); whether it
    is one of the services (role ``service``), whose calls never compete with clients'."""

    name: str = ""
    service: bool = False


# A caller nothing is known of (tests and tools that use the domain directly).
ANONYMOUS = Caller()
