"""A job's bytes (claim check: a job carries a reference, not the content).

The workers read them from a :class:`ContentSource` (the ingest service, over gRPC, in
``analysis_service.ingest_content``) and check them against the job's SHA-256 before
analysing anything.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from analysis_service.domain.models import JobSpec
from analysis_service.errors import PermanentAnalyzerError


class ContentSource(Protocol):
    """Where a job's bytes come from."""

    async def read(self, spec: JobSpec) -> bytes:
        """The bytes ``spec.content_ref`` names.

        Raises ``ContentUnavailable`` when the source cannot be reached now (the job waits
        without using an attempt), ``TransientAnalyzerError`` when another attempt may get
        them, ``PermanentAnalyzerError`` when it would not (missing, too large).
        """


async def fetch_content(source: ContentSource, spec: JobSpec) -> bytes:
    """The job's bytes from ``source``, refused unless they match the job's SHA-256."""
    content = await source.read(spec)
    if hashlib.sha256(content).hexdigest() != spec.sha256:
        raise PermanentAnalyzerError(
            f"content of media {spec.media_id} does not match its sha256",
            reason="CONTENT_CHECKSUM_MISMATCH",
        )
    return content
