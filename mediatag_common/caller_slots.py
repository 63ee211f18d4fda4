"""Slots a service hands out to callers (watch streams, upload streams), bounded three ways.

Clients share ``clients`` slots, one caller holding at most ``per_caller`` of them, so that one
client cannot take them all; each service (a caller with ``service`` set) has ``per_service``
of its own, so that clients holding every slot never keep the services' own calls out.
"""

from __future__ import annotations

import collections
import enum

from mediatag_common.callers import Caller


class SlotsFull(enum.Enum):
    """Which bound a refused caller met."""

    CLIENTS = "clients"
    CALLER = "caller"
    SERVICE = "service"


class CallerSlots:
    """Counts of the slots each caller holds; ``per_caller`` None means half of ``clients``."""

    def __init__(self, *, clients: int, per_caller: int | None, per_service: int) -> None:
        self._limits = {
            SlotsFull.CLIENTS: clients,
            SlotsFull.CALLER: per_caller or max(1, clients // 2),
            SlotsFull.SERVICE: per_service,
        }
        self._held: collections.Counter[Caller] = collections.Counter()
        self._clients = 0
        # Slots held now, clients' and services' (a plain number: metrics read it from
        # another thread).
        self.taken = 0

    def limit(self, bound: SlotsFull) -> int:
        return self._limits[bound]

    def take(self, caller: Caller) -> SlotsFull | None:
        """Take a slot for ``caller``; the bound it met instead, if any."""
        if caller.service:
            if self._held[caller] >= self._limits[SlotsFull.SERVICE]:
                return SlotsFull.SERVICE
        elif self._clients >= self._limits[SlotsFull.CLIENTS]:
            return SlotsFull.CLIENTS
        elif self._held[caller] >= self._limits[SlotsFull.CALLER]:
            return SlotsFull.CALLER
        self._held[caller] += 1
        self._clients += not caller.service
        self.taken += 1
        return None

    def give_back(self, caller: Caller) -> None:
        """Return a slot ``caller`` took."""
        self._held[caller] -= 1
        if not self._held[caller]:
            del self._held[caller]
        self._clients -= not caller.service
        self.taken -= 1
