"""``mediatag copy-blobs``: a local blob directory into the configured blob store."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from ingest_service.blobstores import open_blob_store
from ingest_service.blobstores.copy import CopyReport
from ingest_service.blobstores.copy import copy_blobs as copy_into
from ingest_service.config import IngestConfig
from ingest_service.domain.observer import NoObserver
from ingest_service.errors import IngestError


async def copy_blobs(source: Path, ingest: IngestConfig) -> int:
    """Copy ``source`` into ``ingest``'s blob store; prints what it did; the exit status."""
    try:
        target = await asyncio.to_thread(open_blob_store, ingest, NoObserver())
    except IngestError as exc:
        print(f"nothing copied: {exc}", file=sys.stderr)
        return 1
    report = CopyReport()
    try:
        await copy_into(source, target, report)
    except IngestError as exc:
        print(f"copy stopped: {exc} (run it again to go on)", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        # Ctrl-C: each blob copied is whole (one under way is discarded).
        print(f"{_summary(report)}; interrupted (run it again to go on)")
        raise
    else:
        # Before closing the store, which an interrupt may cut short.
        print(_summary(report))
    finally:
        await target.close()
    return 1 if report.damaged else 0


def _summary(report: CopyReport) -> str:
    return f"copied {report.copied} blob(s); {report.already_there} already there" + (
        f"; {report.damaged} damaged or unreadable, not copied" if report.damaged else ""
    )
