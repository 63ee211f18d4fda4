"""Copying a local blob directory into a blob store, so a deployment can move to a bucket."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest_service.domain.blobs import BlobStore

logger = logging.getLogger(__name__)

# Blobs copied at once; each holds one read chunk (and, for a bucket, one part).
CONCURRENCY = 4
READ_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class CopyReport:
    """What a copy did so far."""

    copied: int = 0
    already_there: int = 0
    # Files whose content does not hash to their name, or that cannot be read: left out, and
    # logged.
    damaged: int = 0


def blob_files(source: Path) -> Iterator[tuple[str, Path]]:
    """The blobs of a local blob directory, ``ab/<sha256>``; its ``incoming/`` is skipped."""
    for fan_out in sorted(source.iterdir()):
        if fan_out.is_dir() and re.fullmatch(r"[0-9a-f]{2}", fan_out.name):
            for path in sorted(fan_out.iterdir()):
                if _SHA256.fullmatch(path.name) and path.name.startswith(fan_out.name):
                    yield path.name, path


async def copy_blobs(source: Path, target: BlobStore, report: CopyReport) -> None:
    """Copy every blob of ``source`` that ``target`` lacks, streamed and its digest checked,
    counting into ``report`` as it goes (so that a copy stopped midway says what it did).

    Safe to run again, also beside a service using ``target``: what is there is skipped. A
    store that fails stops the copy with the store's :class:`~ingest_service.errors.IngestError`.
    """
    files = blob_files(source)

    async def copy(sha256: str, path: Path) -> None:
        if await target.contains(sha256):
            report.already_there += 1
            return
        received = await target.receive()
        try:
            try:
                with path.open("rb") as blob:
                    while chunk := await asyncio.to_thread(blob.read, READ_BYTES):
                        await received.write([chunk])
            except OSError as exc:
                logger.error("%s cannot be read (%s): not copied", path, exc)
                report.damaged += 1
                return
            if await received.finish() != sha256:
                logger.error("%s does not hash to its name: not copied", path)
                report.damaged += 1
                return
            await received.store(sha256)
            report.copied += 1
        finally:
            await received.discard()

    async def copier() -> None:
        # The copiers share one walk of the directory.
        for sha256, path in files:
            await copy(sha256, path)

    # A copier that fails stops the others, each once its upload under way is discarded.
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(copier())
    except ExceptionGroup as failed:
        # The group is how the copiers run, not what went wrong: the first copier's error
        # (the others', if any, are the same store's) is the caller's to handle.
        raise failed.exceptions[0] from None
