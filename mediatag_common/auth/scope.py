"""The caller of the call being served, and the owners it may touch.

The :class:`~mediatag_common.auth.interceptor.AuthInterceptor` puts the principal it found
in a :class:`contextvars.ContextVar`; the servicers ask :func:`owner_scope` what it may touch,
since only they know whose item a request touches. Without a tokens file there is no
principal and the scope is every owner: every check passes.

An owner-restricted caller gets the same ``PERMISSION_DENIED`` for another owner's item as for
an id that does not exist, so it cannot tell other owners' ids from unknown ones.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from mediatag_common.auth.tokens import SERVICE, Principal
from mediatag_common.callers import Caller
from mediatag_common.errors import FieldViolation, PermissionDenied

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "mediatag_principal", default=None
)

# The owner of each known id of a list; unknown ids are left out.
OwnersOf = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]


def current_principal() -> Principal | None:
    """The principal of the call being served; None when authentication is off."""
    return _CURRENT.get()


def set_principal(principal: Principal) -> None:
    """Make ``principal`` the caller for the rest of the current task.

    Set, never reset: each call is served in its own task (its own context), and a streaming
    handler may be finalised in another context, where a reset would fail.
    """
    _CURRENT.set(principal)


def current_caller(peer: str) -> Caller:
    """Who the call being served is from: its principal, or without authentication the
    address of ``peer`` (gRPC's ``ipv4:10.0.0.7:53412``, its port left out)."""
    principal = _CURRENT.get()
    if principal is not None:
        return Caller(principal.name, SERVICE in principal.roles)
    scheme, _, address = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return Caller(f"{scheme}:{address.rpartition(':')[0]}")
    return Caller(peer)


def owner_scope() -> OwnerScope:
    """What the caller of the call being served may touch."""
    principal = _CURRENT.get()
    return OwnerScope(None if principal is None else principal.owners)


@dataclass(frozen=True)
class OwnerScope:
    """The owners a caller may touch: ``owners`` None means every owner."""

    owners: frozenset[str] | None = None

    @property
    def restricted(self) -> bool:
        return self.owners is not None

    def may_see(self, owner_id: str) -> bool:
        return self.owners is None or owner_id in self.owners

    def check_owner(self, owner_id: str, field: str = "owner_id") -> None:
        """Refuse an owner the caller may not touch (an empty one is left to validation)."""
        if owner_id and not self.may_see(owner_id):
            raise PermissionDenied(
                f"this token may not touch owner {owner_id!r}",
                reason="OWNER_NOT_ALLOWED",
                field_violations=[FieldViolation(field, "owner not allowed for this token")],
            )

    def check_item(self, owner_id: str | None, item_id: str, field: str) -> None:
        """Refuse an item of another owner, and an unknown item (``owner_id`` None) alike, for
        a restricted caller; others see unknown items as before (NOT_FOUND, later)."""
        if self.restricted and (owner_id is None or not self.may_see(owner_id)):
            raise PermissionDenied(
                f"this token may not read {item_id!r}",
                reason="OWNER_NOT_ALLOWED",
                field_violations=[FieldViolation(field, "not allowed for this token")],
            )

    async def check_visible(self, item_id: str, owners_of: OwnersOf, field: str) -> None:
        """Refuse, for a restricted caller, an item that is not one of its owners'.

        Another owner's item and an unknown id take the same work, one lookup of the owner and
        one check, and end in the same refusal: the time taken does not tell them apart (the
        full item is read only once it is allowed). Others pass: their unknown ids are
        ``NOT_FOUND`` later.
        """
        if self.restricted:
            owners = await owners_of([item_id])
            self.check_item(owners.get(item_id), item_id, field)

    def list_owner(self, owner_id: str, field: str = "owner_id") -> str:
        """The owner filter of a list call: the one asked for (checked), else the caller's
        only owner. A caller restricted to several owners must name one (the queries filter
        by one)."""
        self.check_owner(owner_id, field)
        if owner_id or self.owners is None:
            return owner_id
        if len(self.owners) == 1:
            (only,) = self.owners
            return only
        raise PermissionDenied(
            "this token may see several owners but not all: name one in owner_id",
            reason="OWNER_NOT_ALLOWED",
            field_violations=[FieldViolation(field, "required for this token")],
        )

    async def check_selection(
        self,
        item_ids: Sequence[str],
        owner_id: str,
        owners_of: OwnersOf,
        field: str = "media_ids",
    ) -> str:
        """The owner filter of a call that acts on listed items or on an owner's items
        (``RetryJobs``, ``ReprocessMedia``).

        For a restricted caller, every listed item must be one of its owners' (looked up in
        one batch with ``owners_of``) and a named owner must be allowed; without ids the filter
        is :meth:`list_owner`'s. Others get ``owner_id`` back unchecked.
        """
        if not self.restricted:
            return owner_id
        if not item_ids:
            return self.list_owner(owner_id)
        owners = await owners_of(item_ids)
        for index, item_id in enumerate(item_ids):
            self.check_item(owners.get(item_id), item_id, f"{field}[{index}]")
        self.check_owner(owner_id)
        return owner_id
