"""The webhooks file: which endpoints the operator wants told of terminal changes.

A TOML file, read at start and again whenever it changes (polled, so an edited mounted
ConfigMap is picked up as well as a rewrite in place)::

    [[endpoints]]
    name = "billing"                       # names the endpoint in logs, metrics, the API
    url = "https://billing.example/hooks"  # http or https; never logged (it may hold a key)
    secret = "whsec_…"                     # Standard Webhooks: base64 of 24 to 64 bytes
    owners = ["listing-7"]                 # optional; absent = every owner
    statuses = ["COMPLETED"]               # optional; absent = COMPLETED and FAILED

A file that cannot be used is refused whole, with a message naming the entry and field
(never a secret): at start the service does not start; on a reload the endpoints in use are
kept and the refusal is logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingest_service.domain.models import ProcessingStatus
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# The changes a webhook may be sent for: the terminal ones.
TERMINAL_STATUSES = frozenset({ProcessingStatus.COMPLETED, ProcessingStatus.FAILED})
# Bounds of what the file may hold: it is read into memory and matched on every change.
MAX_FILE_BYTES = 1024 * 1024
MAX_URL_LENGTH = 2048
MAX_OWNERS_PER_ENDPOINT = 1000
# The Standard Webhooks specification's secret sizes.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
SECRET_PREFIX = "whsec_"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_FIELDS = frozenset({"name", "url", "secret", "owners", "statuses"})


class WebhooksFileError(ValueError):
    """The webhooks file cannot be used; the message says where, never a secret or a URL."""


@dataclass(frozen=True)
class WebhookEndpoint:
    """One receiver. ``owners`` None means every owner."""

    name: str
    # Kept out of the repr: the URL may hold the receiver's key, the secret is one.
    url: str = field(repr=False)
    secret: str = field(repr=False)
    owners: frozenset[str] | None
    statuses: frozenset[ProcessingStatus]

    def wants(self, owner_id: str, status: ProcessingStatus) -> bool:
        """Whether a change of ``owner_id``'s item to ``status`` is sent here."""
        return status in self.statuses and (self.owners is None or owner_id in self.owners)


def _url(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebhooksFileError(f"{where}: url must be a non-empty string")
    if len(value) > MAX_URL_LENGTH:
        raise WebhooksFileError(f"{where}: url longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise WebhooksFileError(f"{where}: url is malformed") from None
    del port  # read only to check it
    if parts.scheme not in ("http", "https"):
        raise WebhooksFileError(f"{where}: url must be http:// or https://")
    if not parts.hostname:
        raise WebhooksFileError(f"{where}: url names no host")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in proxies' logs; a receiver checks the signature.
        raise WebhooksFileError(f"{where}: url must not carry a user name or password")
    if parts.fragment:
        raise WebhooksFileError(f"{where}: url must not have a fragment")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        raise WebhooksFileError(f"{where}: url must not contain spaces or control characters")
    return value


def _secret(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.startswith(SECRET_PREFIX):
        raise WebhooksFileError(f"{where}: secret must be a string starting with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(value.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise WebhooksFileError(f"{where}: secret is not base64 after {SECRET_PREFIX}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise WebhooksFileError(
            f"{where}: secret must encode {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes"
        )
    return value


def _strings(value: object, where: str, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise WebhooksFileError(f"{where}: {what} must be a non-empty list of strings")
    if not all(isinstance(item, str) and item for item in value):
        raise WebhooksFileError(f"{where}: {what} must be a non-empty list of strings")
    return value


def _endpoint(entry: object, index: int) -> WebhookEndpoint:
    where = f"endpoints[{index}]"
    if not isinstance(entry, dict):
        raise WebhooksFileError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise WebhooksFileError(f"{where}: unknown field {unknown[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WebhooksFileError(
            f"{where}: name must be 1 to 64 of a-z, 0-9, '_', '.', '-' (starting with a letter "
            "or digit)"
        )
    where = f"{where} ({name})"
    owners = None
    if "owners" in entry:
        owners = frozenset(_strings(entry["owners"], where, "owners"))
        if len(owners) > MAX_OWNERS_PER_ENDPOINT:
            raise WebhooksFileError(f"{where}: more than {MAX_OWNERS_PER_ENDPOINT} owners")
    statuses = TERMINAL_STATUSES
    if "statuses" in entry:
        names = _strings(entry["statuses"], where, "statuses")
        unknown_statuses = sorted(set(names) - {s.value for s in TERMINAL_STATUSES})
        if unknown_statuses:
            raise WebhooksFileError(
                f"{where}: status {unknown_statuses[0]!r} is not one of COMPLETED, FAILED"
            )
        statuses = frozenset(ProcessingStatus(n) for n in names)
    return WebhookEndpoint(
        name=name,
        url=_url(entry.get("url"), where),
        secret=_secret(entry.get("secret"), where),
        owners=owners,
        statuses=statuses,
    )


def parse_endpoints(text: str, *, max_endpoints: int) -> tuple[WebhookEndpoint, ...]:
    """The endpoints of a webhooks file's text; raises :class:`WebhooksFileError`."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise WebhooksFileError(f"not TOML: {error}") from None
    unknown = sorted(set(data) - {"endpoints"})
    if unknown:
        raise WebhooksFileError(f"unknown table {unknown[0]!r} (only [[endpoints]])")
    entries = data.get("endpoints", [])
    if not isinstance(entries, list):
        raise WebhooksFileError("endpoints must be an array of tables, [[endpoints]]")
    if len(entries) > max_endpoints:
        raise WebhooksFileError(
            f"{len(entries)} endpoints, more than the {max_endpoints} allowed "
            "(--max-webhook-endpoints)"
        )
    endpoints = tuple(_endpoint(entry, index) for index, entry in enumerate(entries))
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.name in seen:
            raise WebhooksFileError(f"endpoint name {endpoint.name!r} appears twice")
        seen.add(endpoint.name)
    return endpoints


def read_endpoints(path: Path, *, max_endpoints: int) -> tuple[WebhookEndpoint, ...]:
    """The endpoints of the file at ``path``; raises :class:`WebhooksFileError`."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise WebhooksFileError(f"{path}: {error.strerror or error}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise WebhooksFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhooksFileError(f"{path}: not UTF-8") from None
    try:
        return parse_endpoints(text, max_endpoints=max_endpoints)
    except WebhooksFileError as error:
        raise WebhooksFileError(f"{path}: {error}") from None


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten, replaced or swapped by a symlink."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class WebhookEndpoints:
    """The endpoints in use, reloaded when the webhooks file changes."""

    def __init__(self, path: Path | None, *, max_endpoints: int, reload_interval: float) -> None:
        self._path = path
        self._max_endpoints = max_endpoints
        self._interval = reload_interval
        # Called on the event loop after each reload that was accepted.
        self.on_change: Callable[[], None] = lambda: None
        self._endpoints: dict[str, WebhookEndpoint] = {}
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Read the file now; raises :class:`WebhooksFileError` (at start: do not serve)."""
        if self._path is None:
            return
        self._seen = _signature(self._path)
        self._use(read_endpoints(self._path, max_endpoints=self._max_endpoints))

    @property
    def current(self) -> Mapping[str, WebhookEndpoint]:
        """The endpoints in use, by name."""
        return self._endpoints

    def for_status(self, status: ProcessingStatus) -> list[WebhookEndpoint]:
        """The endpoints told of changes to ``status`` (of some owners or all)."""
        return [e for e in self._endpoints.values() if status in e.statuses]

    def start(self) -> None:
        if self._path is not None:
            self._task = asyncio.create_task(self._watch(self._path), name="webhooks-file")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def _use(self, endpoints: Iterable[WebhookEndpoint]) -> None:
        self._endpoints = {e.name: e for e in endpoints}

    async def _watch(self, path: Path) -> None:
        while True:
            await asyncio.sleep(self._interval)
            signature = await asyncio.to_thread(_signature, path)
            if signature == self._seen:
                continue
            self._seen = signature
            try:
                endpoints = await asyncio.to_thread(
                    read_endpoints, path, max_endpoints=self._max_endpoints
                )
            except WebhooksFileError as error:
                logger.error("webhooks file refused, keeping the endpoints in use: %s", error)
                continue
            self._use(endpoints)
            logger.info(
                "webhooks file reloaded: %d endpoints (%s)",
                len(self._endpoints),
                ", ".join(self._endpoints) or "none",
            )
            self.on_change()
