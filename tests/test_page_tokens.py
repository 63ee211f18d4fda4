"""Page tokens are opaque and authenticated: a forged or altered one is INVALID_PAGE_TOKEN in
both services and never reaches a query (issue 12, item 1); the key each service signs them
with is kept in its database."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb

from mediatag_common.paging import InvalidPageToken, PageTokens
from tests import media_samples as samples
from tests.conftest import Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.ingest_support import assert_refused, refusal

OWNER = "listing-7"


def forged(key: list[Any], filters: dict[str, Any]) -> str:
    """A token as anyone could make one of the format before: a key and a filter digest."""
    digest = hashlib.sha256(
        json.dumps(filters, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    raw = json.dumps({"k": key, "f": digest}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def altered(token: str) -> str:
    """``token`` with one character of its middle changed."""
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


async def cluster_with_jobs(
    make_cluster: Callable[..., Cluster], *, count: int, first_seed: int
) -> Cluster:
    """Both services started, with ``count`` images of OWNER uploaded and submitted."""
    cluster = make_cluster(analyzer=ScriptedAnalyzer())
    await cluster.start_analysis()
    await cluster.start_ingest()
    await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(
            owner_id=OWNER,
            files=[
                ipb.MediaFile(filename=f"{n}.jpg", content=samples.jpeg_bytes(first_seed + n))
                for n in range(count)
            ],
        )
    )

    async def all_submitted() -> bool:
        jobs = await cluster.analysis.ListJobs(apb.ListJobsRequest(owner_id=OWNER))
        return len(jobs.jobs) == count

    await wait_until(all_submitted)
    return cluster


async def test_forged_and_altered_page_tokens_are_refused_in_both_services(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await cluster_with_jobs(make_cluster, count=3, first_seed=100)
    jobs_filters = {"status": 0, "owner_id": OWNER, "error_reason": ""}
    media_filters = {"owner_id": OWNER, "status": ""}
    first_jobs = await cluster.analysis.ListJobs(apb.ListJobsRequest(owner_id=OWNER, page_size=1))
    first_media = await cluster.ingest.ListMedia(ipb.ListMediaRequest(owner_id=OWNER, page_size=1))

    def jobs_with(token: str, owner: str = OWNER) -> Any:
        return cluster.analysis.ListJobs(apb.ListJobsRequest(owner_id=owner, page_token=token))

    def media_with(
        token: str, status: ipb.ProcessingStatus = ipb.PROCESSING_STATUS_UNSPECIFIED
    ) -> Any:
        return cluster.ingest.ListMedia(
            ipb.ListMediaRequest(owner_id=OWNER, status=status, page_token=token)
        )

    # The two forgeries of the issue, a key that is no key and an integer SQLite cannot hold;
    # then a real token altered, and a real token with another filter.
    bad = [
        jobs_with(forged([{"a": 1}, 0, "x"], jobs_filters)),
        jobs_with(forged([2**70, 0, "x"], jobs_filters)),
        jobs_with(altered(first_jobs.next_page_token)),
        jobs_with(first_jobs.next_page_token, owner="other"),
        media_with(forged([{"a": 1}, "x"], media_filters)),
        media_with(forged([2**70, "x"], media_filters)),
        media_with(altered(first_media.next_page_token)),
        media_with(first_media.next_page_token, status=ipb.PROCESSING_STATUS_FAILED),
    ]
    for call in bad:
        error = await refusal(call)
        assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")
        assert "SELECT" not in (error.details() or "")

    # The tokens the services issued page through everything, each item once.
    job_ids: list[str] = []
    jobs_request = apb.ListJobsRequest(owner_id=OWNER, page_size=1)
    while True:
        jobs_page = await cluster.analysis.ListJobs(jobs_request)
        job_ids.extend(job.media_id for job in jobs_page.jobs)
        jobs_request.page_token = jobs_page.next_page_token
        if not jobs_request.page_token:
            break
    media_ids: list[str] = []
    media_request = ipb.ListMediaRequest(owner_id=OWNER, page_size=1)
    while True:
        media_page = await cluster.ingest.ListMedia(media_request)
        media_ids.extend(media.id for media in media_page.media)
        media_request.page_token = media_page.next_page_token
        if not media_request.page_token:
            break
    assert sorted(job_ids) == sorted(media_ids)
    assert len(set(media_ids)) == 3


def test_a_token_is_bound_to_its_secret_its_filters_and_its_key_types() -> None:
    tokens = PageTokens(b"s" * 32)
    filters = {"owner_id": OWNER}
    token = tokens.issue([5, 1.5, "m"], filters)
    assert tokens.resume_after(token, filters, (int, float, str)) == (5, 1.5, "m")
    assert tokens.resume_after("", filters, (int, float, str)) is None
    attempts: list[Callable[[], object]] = [
        lambda: PageTokens(b"t" * 32).resume_after(token, filters, (int, float, str)),
        lambda: tokens.resume_after(token, {"owner_id": "other"}, (int, float, str)),
        lambda: tokens.resume_after("not a token!", filters, (int, float, str)),
        # Signed, but not of the listing's key: the types are checked all the same.
        lambda: tokens.resume_after(token, filters, (str, float, str)),
        lambda: tokens.resume_after(token, filters, (int, str)),
        lambda: tokens.resume_after(
            tokens.issue([2**70, 0.0, "m"], filters), filters, (int, float, str)
        ),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidPageToken):
            attempt()


async def test_a_token_stays_good_across_a_restart_of_its_service(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The key is kept in each service's database: replicas sharing it, and the service after
    a restart, accept the tokens it issued."""
    cluster = await cluster_with_jobs(make_cluster, count=2, first_seed=200)
    first_jobs = await cluster.analysis.ListJobs(apb.ListJobsRequest(owner_id=OWNER, page_size=1))
    first_media = await cluster.ingest.ListMedia(ipb.ListMediaRequest(owner_id=OWNER, page_size=1))
    await cluster.stop_ingest()
    await cluster.stop_analysis()
    await cluster.start_analysis()
    await cluster.start_ingest()

    rest_jobs = await cluster.analysis.ListJobs(
        apb.ListJobsRequest(owner_id=OWNER, page_token=first_jobs.next_page_token)
    )
    rest_media = await cluster.ingest.ListMedia(
        ipb.ListMediaRequest(owner_id=OWNER, page_token=first_media.next_page_token)
    )
    assert len(rest_jobs.jobs) == 1
    assert rest_jobs.jobs[0].media_id != first_jobs.jobs[0].media_id
    assert [m.id for m in rest_media.media] != [m.id for m in first_media.media]
    assert len(rest_media.media) == 1
