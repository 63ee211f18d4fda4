"""A job's bytes are analysed only if they match the SHA-256 the job was submitted with."""

from __future__ import annotations

import hashlib

import pytest

from analysis_service.domain.content import fetch_content
from analysis_service.domain.models import JobSpec
from analysis_service.errors import PermanentAnalyzerError

UPLOADED = b"the bytes ingest stored"


class StoredBytes:
    """A content source that answers every reference with the same bytes."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    async def read(self, spec: JobSpec) -> bytes:
        return self._content


def job_for(content: bytes) -> JobSpec:
    return JobSpec(
        media_id="m-1",
        owner_id="owner",
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        content_type="image/jpeg",
        content_ref="m-1",
    )


async def test_matching_bytes_are_returned() -> None:
    assert await fetch_content(StoredBytes(UPLOADED), job_for(UPLOADED)) == UPLOADED


async def test_bytes_that_do_not_match_fail_the_job_for_good() -> None:
    with pytest.raises(PermanentAnalyzerError) as refused:
        await fetch_content(StoredBytes(UPLOADED + b"!"), job_for(UPLOADED))
    assert refused.value.reason == "CONTENT_CHECKSUM_MISMATCH"
    assert not refused.value.transient
