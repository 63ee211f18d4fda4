"""The pipeline end to end in-process: upload -> outbox -> queue -> workers -> events -> mirror."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig, RetryPolicy
from analysis_service.errors import PermanentAnalyzerError, TransientAnalyzerError
from mediatag_common.errors import error_info, field_violations
from tests.conftest import ON_BOTH_DATABASES, PATIENCE, Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes, mp4_bytes

TERMINAL = {ipb.PROCESSING_STATUS_COMPLETED, ipb.PROCESSING_STATUS_FAILED}

# The analysis service on SQLite and on PostgreSQL.
pytestmark = ON_BOTH_DATABASES


def image_files(count: int, first_seed: int = 0) -> list[ipb.MediaFile]:
    return [
        ipb.MediaFile(
            filename=f"photo{n}.jpg", content_type="image/jpeg", content=jpeg_bytes(seed=n)
        )
        for n in range(first_seed, first_seed + count)
    ]


async def upload(
    cluster: Cluster, files: list[ipb.MediaFile], owner: str = "listing-1"
) -> ipb.UploadMediaResponse:
    response: ipb.UploadMediaResponse = await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(owner_id=owner, category="Hair", files=files), timeout=PATIENCE
    )
    return response


async def wait_terminal(cluster: Cluster, media_ids: list[str]) -> list[ipb.Media]:
    """Wait until ingest's mirror shows every item terminal; return them (full view)."""
    stub = cluster.ingest
    found: list[ipb.Media] = []

    async def all_terminal() -> bool:
        found.clear()
        for media_id in media_ids:
            response = await stub.GetMedia(
                ipb.GetMediaRequest(media_id=media_id, view=ipb.MEDIA_VIEW_FULL), timeout=PATIENCE
            )
            found.append(response.media)
        return all(m.status in TERMINAL for m in found)

    await wait_until(all_terminal)
    return list(found)


async def test_upload_five_images_and_a_video_completes_through_ingest(
    make_cluster: Callable[..., Cluster],
) -> None:
    analyzer = ScriptedAnalyzer()
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()

    files = [*image_files(5), ipb.MediaFile(filename="clip.mp4", content=mp4_bytes())]
    response = await upload(cluster, files)

    assert response.count == 6
    assert response.message == (
        "Uploaded 6 media file(s). 5 image(s) are being analyzed in the background."
    )
    statuses = [m.status for m in response.media]
    assert statuses == [ipb.PROCESSING_STATUS_PENDING] * 5 + [ipb.PROCESSING_STATUS_NOT_APPLICABLE]
    image_ids = [m.id for m in response.media[:5]]
    done = await wait_terminal(cluster, image_ids)
    for media in done:
        assert media.status == ipb.PROCESSING_STATUS_COMPLETED
        assert media.tags, media
        assert all(tag == tag.lower() and " " not in tag for tag in media.tags)
        assert len(media.embedding) == 1408 == media.embedding_dimensions
        assert media.analyzer_name == "local"
        assert media.reused is False
    assert len(analyzer.calls) == 5
    video = (
        await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=response.media[5].id))
    ).media
    assert video.status == ipb.PROCESSING_STATUS_NOT_APPLICABLE
    assert video.kind == ipb.MEDIA_KIND_VIDEO


async def test_identical_bytes_reuse_the_result_without_an_analyser_call(
    make_cluster: Callable[..., Cluster],
) -> None:
    analyzer = ScriptedAnalyzer()
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()

    first = await upload(cluster, image_files(1))
    (original,) = await wait_terminal(cluster, [first.media[0].id])
    assert len(analyzer.calls) == 1

    # Same bytes, another owner and category: the local analyser's result does not depend on them.
    again = await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(owner_id="listing-2", category="Nails", files=image_files(1)),
        timeout=PATIENCE,
    )
    (reused,) = await wait_terminal(cluster, [again.media[0].id])

    assert reused.status == ipb.PROCESSING_STATUS_COMPLETED
    assert reused.reused is True
    assert list(reused.tags) == list(original.tags)
    assert list(reused.embedding) == list(original.embedding)
    assert len(analyzer.calls) == 1


async def test_concurrent_identical_uploads_make_one_analyser_call(
    make_cluster: Callable[..., Cluster],
) -> None:
    analyzer = ScriptedAnalyzer(delay=0.3)
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()

    same = image_files(1)[0]
    response = await upload(cluster, [same, same, same, same])
    done = await wait_terminal(cluster, [m.id for m in response.media])

    assert all(m.status == ipb.PROCESSING_STATUS_COMPLETED for m in done)
    assert len(analyzer.calls) == 1
    assert sorted(m.reused for m in done) == [False, True, True, True]


async def test_upload_succeeds_while_analysis_is_down_and_completes_once_it_starts(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_ingest()

    response = await upload(cluster, image_files(3))
    assert [m.status for m in response.media] == [ipb.PROCESSING_STATUS_PENDING] * 3

    await cluster.start_analysis()
    done = await wait_terminal(cluster, [m.id for m in response.media])
    assert all(m.status == ipb.PROCESSING_STATUS_COMPLETED for m in done)


async def test_jobs_wait_for_an_unreachable_ingest_without_using_attempts(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(
            retry=RetryPolicy(max_attempts=2, backoff_base=0.05, backoff_max=0.2),
            rate_limits={"local": RateLimitConfig(50, 1)},
        ),
    )
    await cluster.start_analysis()
    analysis = cluster.analysis
    await analysis.PauseQueue(apb.PauseQueueRequest())
    await cluster.start_ingest()
    ids = [m.id for m in (await upload(cluster, image_files(3, first_seed=70))).media]

    async def submitted() -> bool:
        status = await analysis.GetQueueStatus(apb.GetQueueStatusRequest())
        counts = {c.status: c.count for c in status.counts}
        return counts.get(apb.PROCESSING_STATUS_PENDING, 0) == len(ids)

    await wait_until(submitted)
    await cluster.stop_ingest()
    await analysis.ResumeQueue(apb.ResumeQueueRequest())

    async def put_off_beyond_max_attempts() -> bool:
        for media_id in ids:
            job = (await analysis.GetJob(apb.GetJobRequest(media_id=media_id))).job
            refused = [a for a in job.attempts if a.outcome == "CONTENT_UNAVAILABLE"]
            if len(refused) <= job.max_attempts or job.status == apb.PROCESSING_STATUS_FAILED:
                return False
        return True

    await wait_until(put_off_beyond_max_attempts)
    await cluster.start_ingest()
    # This process's failed connections to the stopped ingest back off before reconnecting.
    await cluster.ingest.GetMedia(
        ipb.GetMediaRequest(media_id=ids[0]), timeout=PATIENCE, wait_for_ready=True
    )
    done = await wait_terminal(cluster, ids)
    assert [m.status for m in done] == [ipb.PROCESSING_STATUS_COMPLETED] * len(ids)
    for media_id in ids:
        job = (await analysis.GetJob(apb.GetJobRequest(media_id=media_id))).job
        assert job.attempt == 1
        assert job.attempts[-1].outcome == "COMPLETED"
        assert {a.error.reason for a in job.attempts[:-1]} == {"CONTENT_UNAVAILABLE"}


async def test_transient_errors_are_retried_permanent_fail_at_once_and_retry_brings_back(
    make_cluster: Callable[..., Cluster],
) -> None:
    flaky, broken, hopeless = (jpeg_bytes(seed=n) for n in (10, 11, 12))
    sha = {
        name: hashlib.sha256(data).hexdigest()
        for name, data in {"flaky": flaky, "broken": broken, "hopeless": hopeless}.items()
    }
    analyzer = ScriptedAnalyzer(
        failures={
            sha["flaky"]: [
                TransientAnalyzerError("upstream 503"),
                TransientAnalyzerError("upstream deadline"),
            ]
        },
        fail_always={
            sha["broken"]: PermanentAnalyzerError("cannot decode", reason="IMAGE_UNDECODABLE"),
            sha["hopeless"]: TransientAnalyzerError("upstream 503"),
        },
    )
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(
            rate_limits={"local": RateLimitConfig(50, 1)},
            retry=RetryPolicy(max_attempts=3, backoff_base=0.2, jitter=0.2),
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()

    files = [
        ipb.MediaFile(filename=f"{name}.jpg", content=data)
        for name, data in (("flaky", flaky), ("broken", broken), ("hopeless", hopeless))
    ]
    response = await upload(cluster, files)
    ids = {
        name: m.id for name, m in zip(("flaky", "broken", "hopeless"), response.media, strict=True)
    }
    done = {m.id: m for m in await wait_terminal(cluster, list(ids.values()))}

    assert done[ids["flaky"]].status == ipb.PROCESSING_STATUS_COMPLETED
    assert done[ids["flaky"]].attempt == 3
    assert analyzer.calls_for(sha["flaky"]) == 3
    flaky_calls = [c.at for c in analyzer.calls if c.sha256 == sha["flaky"]]
    gaps = [b - a for a, b in itertools.pairwise(flaky_calls)]
    # Backoff 0.2 s then 0.4 s, each +/- 20 % jitter. Lower bounds only: on a loaded machine
    # any gap can be longer, so comparing two gaps says nothing about the backoff.
    assert gaps[0] >= 0.2 * 0.8, gaps
    assert gaps[1] >= 0.4 * 0.8, gaps

    assert done[ids["broken"]].status == ipb.PROCESSING_STATUS_FAILED
    assert done[ids["broken"]].error.reason == "IMAGE_UNDECODABLE"
    assert analyzer.calls_for(sha["broken"]) == 1

    assert done[ids["hopeless"]].status == ipb.PROCESSING_STATUS_FAILED
    assert done[ids["hopeless"]].error.reason == "ANALYZER_UNAVAILABLE"
    assert analyzer.calls_for(sha["hopeless"]) == 3
    job = (await cluster.analysis.GetJob(apb.GetJobRequest(media_id=ids["hopeless"]))).job
    assert job.status == apb.PROCESSING_STATUS_FAILED
    assert [a.number for a in job.attempts] == [1, 2, 3]
    assert [a.outcome for a in job.attempts] == ["RETRY_SCHEDULED", "RETRY_SCHEDULED", "FAILED"]
    assert all(a.error.reason == "ANALYZER_UNAVAILABLE" and a.error.transient for a in job.attempts)

    dead_letters = await cluster.analysis.ListJobs(
        apb.ListJobsRequest(status=apb.PROCESSING_STATUS_FAILED)
    )
    assert {j.media_id for j in dead_letters.jobs} == {ids["broken"], ids["hopeless"]}

    # The upstream recovers; an explicit retry brings the job back with fresh attempts.
    del analyzer.fail_always[sha["hopeless"]]
    retried = await cluster.ingest.ReprocessMedia(
        ipb.ReprocessMediaRequest(media_ids=[ids["hopeless"]])
    )
    assert list(retried.media_ids) == [ids["hopeless"]]

    async def hopeless_completed() -> bool:
        media = (await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=ids["hopeless"]))).media
        return media.status == ipb.PROCESSING_STATUS_COMPLETED

    await wait_until(hopeless_completed)
    job = (await cluster.analysis.GetJob(apb.GetJobRequest(media_id=ids["hopeless"]))).job
    assert job.attempt == 1
    assert [a.outcome for a in job.attempts][-1] == "COMPLETED"


async def test_rate_limit_holds_over_ten_seconds(make_cluster: Callable[..., Cluster]) -> None:
    rate, burst = 4.0, 1
    analyzer = ScriptedAnalyzer(dimensions=64)
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(
            workers=8, embedding_dimensions=64, rate_limits={"local": RateLimitConfig(rate, burst)}
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()

    jobs = 46  # 11.5 s of calls at 4/s
    ids: list[str] = []
    for first in range(0, jobs, 23):
        response = await upload(cluster, image_files(23, first_seed=100 + first))
        ids.extend(m.id for m in response.media)
    await wait_terminal(cluster, ids)

    times = sorted(call.at for call in analyzer.calls)
    assert len(times) == jobs
    assert times[-1] - times[0] >= 10.0
    most_in_one_second = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert most_in_one_second <= rate + burst, most_in_one_second


async def test_waiting_for_the_rate_limit_does_not_count_against_the_analyser_timeout(
    make_cluster: Callable[..., Cluster],
) -> None:
    # Calls 1 s apart, four workers, a 0.5 s analyser timeout and one attempt per job:
    # the third job queues 2 s for its slot, yet only its call is timed.
    analyzer = ScriptedAnalyzer(dimensions=64)
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(
            workers=4,
            embedding_dimensions=64,
            analyzer_timeout=0.5,
            retry=RetryPolicy(max_attempts=1),
            rate_limits={"local": RateLimitConfig(1.0, 1)},
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    ids = [m.id for m in (await upload(cluster, image_files(4, first_seed=130))).media]
    done = await wait_terminal(cluster, ids)
    assert [m.status for m in done] == [ipb.PROCESSING_STATUS_COMPLETED] * len(ids)
    times = sorted(call.at for call in analyzer.calls)
    assert times[-1] - times[0] >= 2.5  # they did wait their turn


@pytest.mark.parametrize("view", [ipb.MEDIA_VIEW_BASIC, ipb.MEDIA_VIEW_UNSPECIFIED])
async def test_basic_view_leaves_out_the_embedding(
    make_cluster: Callable[..., Cluster], view: ipb.MediaView
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    response = await upload(cluster, image_files(1))
    await wait_terminal(cluster, [response.media[0].id])

    media = (
        await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=response.media[0].id, view=view))
    ).media
    assert media.status == ipb.PROCESSING_STATUS_COMPLETED
    assert media.tags
    assert not media.embedding
    assert media.embedding_dimensions == 1408


async def test_unknown_job_is_not_found_with_reason(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(analyzer=ScriptedAnalyzer())
    await cluster.start_analysis()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cluster.analysis.GetJob(apb.GetJobRequest(media_id="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info is not None
    assert (info.reason, info.domain) == ("JOB_NOT_FOUND", "mediatag")
    assert [v.field for v in field_violations(caught.value)] == ["media_id"]
