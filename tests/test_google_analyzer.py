"""The google analyser through the whole pipeline, against local fakes of Google's APIs.

The real ``ImageAnnotatorAsyncClient`` and ``PredictionServiceAsyncClient`` talk gRPC to
``FakeVision`` and ``FakeVertex`` (tests/google_fakes.py), which speak the real Google protos.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import itertools
import math
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest

from tests.conftest import PATIENCE, Cluster, skip_without_google_extra

skip_without_google_extra()

import google.cloud
import numpy as np
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import vision_v1
from google.cloud.aiplatform_v1.types import prediction_service
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb
from PIL import Image

from analysis_service.analyzers.base import AnalysisInput
from analysis_service.analyzers.google import GoogleAnalyzer
from analysis_service.analyzers.google_clients import classify
from analysis_service.analyzers.google_images import (
    EMBEDDING_TYPES,
    VISION_TYPES,
    ImageLimits,
    fit,
    open_upload,
)
from analysis_service.analyzers.google_tags import normalise, parse_refined
from analysis_service.analyzers.registry import build_analyzer
from analysis_service.config import AnalysisConfig, GoogleConfig, RateLimitConfig, RetryPolicy
from analysis_service.errors import PermanentAnalyzerError, QuotaExceeded, TransientAnalyzerError
from mediatag_cli.main import build_parser
from mediatag_cli.settings import SettingsError, serve_settings
from tests.google_fakes import (
    ANNOTATE,
    BAD_IMAGE_DATA,
    GENERATE,
    HANG,
    PREDICT,
    FakeVertex,
    FakeVision,
    internal,
    invalid_argument,
    quota,
    unavailable,
)
from tests.media_samples import encode, jpeg_bytes, photo, webp_bytes
from tests.test_pipeline import wait_terminal

PROJECT = "test-project"
EMBEDDING_PATH = (
    f"projects/{PROJECT}/locations/us-central1/publishers/google/models/multimodalembedding@001"
)
GEMINI_PATH = f"projects/{PROJECT}/locations/us-central1/publishers/google/models/gemini-2.5-flash"
VECTOR = [math.sin(i * 0.37) + 0.1 for i in range(1408)]
LIKELY = vision_v1.Likelihood
# What FakeVision answers, and the tags that makes at a minimum score of 0.6.
LABELS = [("Hair", 0.97), ("Hairstyle", 0.94), ("Chin", 0.58)]
OBJECTS = [("Person", 0.91), ("Hair", 0.7)]
COLOURS = [(30.0, 30.0, 30.0, 0.6), (200.0, 150.0, 120.0, 0.3)]
SAFE_SEARCH: dict[str, int] = {
    "adult": LIKELY.VERY_UNLIKELY,
    "violence": LIKELY.UNLIKELY,
    "racy": LIKELY.LIKELY,
}
VISION_TAGS = ["hair", "hairstyle", "person", "dominant-black", "unsafe-racy"]
FAST = {"vision": RateLimitConfig(50), "embeddings": RateLimitConfig(50)}


@pytest.fixture(autouse=True)
def no_application_default_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A key file that does not exist: an ADC lookup fails at once, before google-auth would
    probe the Compute Engine metadata server (no traffic leaves the machine)."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))


@pytest.fixture
async def vision() -> AsyncIterator[FakeVision]:
    fake = FakeVision(labels=LABELS, objects=OBJECTS, colours=COLOURS, safe_search=SAFE_SEARCH)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def vertex() -> AsyncIterator[FakeVertex]:
    fake = FakeVertex(vector=VECTOR)
    await fake.start()
    yield fake
    await fake.stop()


def google_config(vision: FakeVision, vertex: FakeVertex, **overrides: object) -> GoogleConfig:
    settings: dict[str, object] = {
        "project": PROJECT,
        "vision_endpoint": vision.endpoint,
        "vertex_endpoint": vertex.endpoint,
        "insecure": True,
        "request_timeout": 5.0,
        **overrides,
    }
    return GoogleConfig(**settings)  # type: ignore[arg-type]


async def start_cluster(
    make_cluster: Callable[..., Cluster],
    google: GoogleConfig,
    *,
    rate_limits: Mapping[str, RateLimitConfig] = FAST,
    retry: RetryPolicy | None = None,
    workers: int = 4,
) -> Cluster:
    cluster = make_cluster(
        analysis_config=AnalysisConfig(
            analyzer="google",
            google=google,
            rate_limits=rate_limits,
            retry=retry or RetryPolicy(max_attempts=3, backoff_base=0.05),
            workers=workers,
        )
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    return cluster


async def upload(
    cluster: Cluster, *contents: bytes, context: Mapping[str, str] | None = None
) -> list[str]:
    response = await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(
            owner_id="listing-1",
            category="Hair",
            context=context or {},
            files=[
                ipb.MediaFile(filename=f"photo{n}", content=content)
                for n, content in enumerate(contents)
            ],
        ),
        timeout=PATIENCE,
    )
    return [m.id for m in response.media]


async def job(cluster: Cluster, media_id: str) -> apb.Job:
    response = await cluster.analysis.GetJob(apb.GetJobRequest(media_id=media_id), timeout=PATIENCE)
    return response.job


def unit(values: list[float]) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


def embedded_bytes(request: prediction_service.PredictRequest) -> bytes:
    instance = json_format.MessageToDict(prediction_service.PredictRequest.pb(request).instances[0])
    return base64.b64decode(instance["image"]["bytesBase64Encoded"])


# ---- through the pipeline ----


async def test_upload_completes_with_the_fakes_tags_and_vector(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    cluster = await start_cluster(make_cluster, google_config(vision, vertex))
    image = jpeg_bytes(seed=1)
    (media_id,) = await upload(cluster, image)
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_COMPLETED, media.error
    assert list(media.tags) == VISION_TAGS
    assert media.analyzer_name == "google"
    assert media.embedding_dimensions == 1408
    assert np.allclose(np.asarray(media.embedding), unit(VECTOR), atol=1e-6)

    (annotate,) = vision.requests()
    (one,) = annotate.requests
    assert one.image.content == image
    feature = vision_v1.Feature.Type
    assert [(f.type_, f.max_results) for f in one.features] == [
        (feature.LABEL_DETECTION, 20),
        (feature.OBJECT_LOCALIZATION, 10),
        (feature.IMAGE_PROPERTIES, 0),
        (feature.SAFE_SEARCH_DETECTION, 0),
    ]
    (predict,) = vertex.predict_requests()
    assert predict.endpoint == EMBEDDING_PATH
    assert embedded_bytes(predict) == image
    parameters = prediction_service.PredictRequest.pb(predict).parameters
    assert json_format.MessageToDict(parameters) == {"dimension": 1408}
    # Each call carried our deadline (5 s), not the library's default (minutes).
    for call in (*vision.calls(ANNOTATE), *vertex.calls(PREDICT)):
        assert call.time_remaining is not None
        assert 0 < call.time_remaining <= 5.01
    assert vertex.calls(GENERATE) == []

    # The same bytes again: the cached result, no call to Google.
    (again_id,) = await upload(cluster, image)
    (again,) = await wait_terminal(cluster, [again_id])
    assert again.reused is True
    assert list(again.tags) == VISION_TAGS
    assert len(vision.requests()) == 1
    assert len(vertex.predict_requests()) == 1


async def test_gemini_refines_the_tags_and_an_answer_that_is_not_json_keeps_visions(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vertex.answers = [
        '{"tags": ["Men\'s fade haircut", "Textured crop", "hair"]}',
        "Sure! Here are some tags: hair, fade",
    ]
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex, refine_tags=True),
        rate_limits={**FAST, "gemini": RateLimitConfig(50)},
    )
    first, second = jpeg_bytes(seed=2), jpeg_bytes(seed=3)
    (first_id,) = await upload(cluster, first, context={"style": "skin fade"})
    (refined,) = await wait_terminal(cluster, [first_id])
    (second_id,) = await upload(cluster, second)
    (plain,) = await wait_terminal(cluster, [second_id])

    assert refined.status == ipb.PROCESSING_STATUS_COMPLETED, refined.error
    assert list(refined.tags) == [
        "mens-fade-haircut",
        "textured-crop",
        "hair",
        *VISION_TAGS[1:],
    ]
    assert plain.status == ipb.PROCESSING_STATUS_COMPLETED, plain.error
    assert list(plain.tags) == VISION_TAGS

    request = vertex.generate_requests()[0]
    assert request.model == GEMINI_PATH
    image_part, text_part = request.contents[0].parts
    assert image_part.inline_data.data == first
    assert image_part.inline_data.mime_type == "image/jpeg"
    assert '"category": "Hair"' in text_part.text
    assert '"style": "skin fade"' in text_part.text
    assert '"name": "Hairstyle"' in text_part.text
    assert request.generation_config.response_mime_type == "application/json"
    assert len(vertex.generate_requests()) == 2


async def test_a_gemini_answer_that_is_not_json_completes_its_job_but_is_not_cached(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    """Vision's tags alone are a fallback: the next job with the same content asks Gemini
    again (and only Gemini: Vision's and the embeddings' answers were kept), and its refined
    result is the one cached."""
    vertex.answers = ["I'm sorry, I can't help with that.", '{"tags": ["Fade"]}']
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex, refine_tags=True),
        rate_limits={**FAST, "gemini": RateLimitConfig(50)},
    )
    image = jpeg_bytes(seed=21)
    done = []
    for _ in range(3):
        (media_id,) = await upload(cluster, image)
        done += await wait_terminal(cluster, [media_id])
    fallback, refined, reused = done

    assert all(m.status == ipb.PROCESSING_STATUS_COMPLETED for m in done), done
    assert (list(fallback.tags), fallback.reused) == (VISION_TAGS, False)
    assert (list(refined.tags), refined.reused) == (["fade", *VISION_TAGS], False)
    assert (list(reused.tags), reused.reused) == (["fade", *VISION_TAGS], True)
    calls = (len(vision.calls(ANNOTATE)), len(vertex.calls(PREDICT)), len(vertex.calls(GENERATE)))
    assert calls == (1, 1, 2)
    # The fallback's job keeps the result it completed with, not the one cached since.
    assert list((await job(cluster, fallback.id)).result.tags) == VISION_TAGS


async def test_quota_errors_are_absorbed_without_using_up_attempts(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vision.fail_next(ANNOTATE, quota(retry_delay=0.4), quota(retry_delay=0.4))
    vertex.fail_next(PREDICT, quota("Quota exceeded for online prediction requests"))
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex),
        # A single attempt: a quota refusal that counted as one would fail the job.
        retry=RetryPolicy(max_attempts=1, backoff_base=0.05),
    )
    (media_id,) = await upload(cluster, jpeg_bytes(seed=4))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_COMPLETED, media.error
    assert media.attempt == 1
    # Refused, refused, answered (then embeddings refused: their retry alone is called).
    calls = [c.at for c in vision.calls(ANNOTATE)]
    assert len(calls) == 3
    assert len(vertex.calls(PREDICT)) == 2
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    # The retry delay the error carried is honoured.
    assert gaps[0] >= 0.38, gaps
    assert gaps[1] >= 0.38, gaps
    attempts = (await job(cluster, media_id)).attempts
    assert [a.outcome for a in attempts] == ["QUOTA_EXCEEDED"] * 3 + ["COMPLETED"]
    assert all(a.error.reason == "QUOTA_EXCEEDED" for a in attempts[:3])
    status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest(), timeout=PATIENCE)
    quota_errors = {limit.api: limit.quota_errors for limit in status.rate_limits}
    assert quota_errors == {"vision": 2, "embeddings": 1}


async def test_a_job_put_off_by_a_later_apis_quota_does_not_call_the_earlier_apis_again(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    """Vision answered, then the embeddings were refused once and Gemini three times: each
    retry calls only what has not answered yet (the rest is kept until the analysis
    completes), where it used to call Vision and the embeddings again each time."""
    vertex.fail_next(PREDICT, quota(retry_delay=0.1))
    vertex.fail_next(GENERATE, *[quota(retry_delay=0.1)] * 3)
    vertex.answers = ['{"tags": ["Fade"]}']
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex, refine_tags=True),
        rate_limits={**FAST, "gemini": RateLimitConfig(50)},
        retry=RetryPolicy(max_attempts=1, backoff_base=0.05),
    )
    (media_id,) = await upload(cluster, jpeg_bytes(seed=20))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_COMPLETED, media.error
    assert list(media.tags) == ["fade", *VISION_TAGS]
    assert np.allclose(np.asarray(media.embedding), unit(VECTOR), atol=1e-6)
    calls = (len(vision.calls(ANNOTATE)), len(vertex.calls(PREDICT)), len(vertex.calls(GENERATE)))
    assert calls == (1, 2, 4)
    attempts = (await job(cluster, media_id)).attempts
    assert [a.outcome for a in attempts] == ["QUOTA_EXCEEDED"] * 4 + ["COMPLETED"]


async def test_transient_errors_are_retried(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vision.fail_next(ANNOTATE, unavailable())
    vertex.fail_next(PREDICT, internal())
    cluster = await start_cluster(make_cluster, google_config(vision, vertex))
    (media_id,) = await upload(cluster, jpeg_bytes(seed=5))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_COMPLETED, media.error
    assert media.attempt == 3
    assert list(media.tags) == VISION_TAGS
    # One call per attempt (the library's own retry is off), and none to Vision once it
    # answered (attempt 2).
    assert len(vision.calls(ANNOTATE)) == 2
    assert len(vertex.calls(PREDICT)) == 2
    attempts = (await job(cluster, media_id)).attempts
    assert [a.outcome for a in attempts] == ["RETRY_SCHEDULED", "RETRY_SCHEDULED", "COMPLETED"]
    assert [(a.error.reason, a.error.transient) for a in attempts[:2]] == [
        ("ANALYZER_UNAVAILABLE", True)
    ] * 2
    assert "ServiceUnavailable" in attempts[0].error.message
    assert "InternalServerError" in attempts[1].error.message


async def test_permanent_errors_fail_at_once_with_the_reason(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    cluster = await start_cluster(make_cluster, google_config(vision, vertex))

    vertex.fail_next(PREDICT, invalid_argument("Image format not supported."))
    (rejected_id,) = await upload(cluster, jpeg_bytes(seed=6))
    (rejected,) = await wait_terminal(cluster, [rejected_id])
    assert rejected.status == ipb.PROCESSING_STATUS_FAILED
    assert rejected.attempt == 1
    assert rejected.error.reason == "ANALYZER_REJECTED"
    assert "Image format not supported." in rejected.error.message
    assert len(vertex.calls(PREDICT)) == 1

    vision.image_error = BAD_IMAGE_DATA
    (bad_id,) = await upload(cluster, jpeg_bytes(seed=7))
    (bad,) = await wait_terminal(cluster, [bad_id])
    assert bad.status == ipb.PROCESSING_STATUS_FAILED
    assert bad.attempt == 1
    assert bad.error.reason == "ANALYZER_REJECTED"
    assert "Bad image data." in bad.error.message
    assert len(vision.calls(ANNOTATE)) == 2
    # Vision refused the image: no embedding was asked for.
    assert len(vertex.calls(PREDICT)) == 1
    assert not bad.tags
    assert not bad.embedding


async def test_a_fake_that_never_answers_is_cut_off_by_our_timeout(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vision.always[ANNOTATE] = HANG
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex, request_timeout=0.3),
        retry=RetryPolicy(max_attempts=2, backoff_base=0.05),
    )
    (media_id,) = await upload(cluster, jpeg_bytes(seed=8))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_FAILED
    assert media.attempt == 2
    assert media.error.reason == "ANALYZER_TIMEOUT"
    assert "0.3 s" in media.error.message
    calls = vision.calls(ANNOTATE)
    assert len(calls) == 2
    assert all(c.time_remaining is not None and c.time_remaining <= 0.31 for c in calls), [
        c.time_remaining for c in calls
    ]
    assert vertex.calls(PREDICT) == []


async def test_each_api_stays_under_its_own_rate_limit(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vision_rate, embeddings_rate, jobs = 4.0, 2.0, 10
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex),
        rate_limits={
            "vision": RateLimitConfig(vision_rate),
            "embeddings": RateLimitConfig(embeddings_rate),
        },
        workers=jobs,
    )
    ids = await upload(cluster, *(jpeg_bytes(seed=100 + n, size=(64, 48)) for n in range(jobs)))
    done = await wait_terminal(cluster, ids)
    assert all(m.status == ipb.PROCESSING_STATUS_COMPLETED for m in done)

    for method, rate, calls in (
        ("vision", vision_rate, [c.at for c in vision.calls(ANNOTATE)]),
        ("embeddings", embeddings_rate, [c.at for c in vertex.calls(PREDICT)]),
    ):
        assert len(calls) == jobs, method
        most_in_one_second = max(sum(1 for t in calls if s <= t < s + 1.0) for s in calls)
        assert most_in_one_second <= rate + 1, (method, most_in_one_second)
        # Each limiter is the one holding its API back: calls spaced at its own rate.
        assert calls[-1] - calls[0] >= (jobs - 1) / rate * 0.9, (method, calls)
    # Separate limiters: Vision ran ahead at its higher rate.
    assert vision.calls(ANNOTATE)[-1].at < vertex.calls(PREDICT)[-1].at - 1.5


async def test_images_above_the_limits_are_downscaled_and_formats_converted(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    cluster = await start_cluster(
        make_cluster, google_config(vision, vertex, max_image_pixels=20_000)
    )
    large = jpeg_bytes(seed=9, size=(320, 240))
    small_webp = webp_bytes(seed=10, size=(100, 75))
    ids = await upload(cluster, large)
    ids += await upload(cluster, small_webp)
    done = await wait_terminal(cluster, ids)
    assert all(m.status == ipb.PROCESSING_STATUS_COMPLETED for m in done), done

    # Two jobs in flight at once: tell their requests apart by content, not by order.
    vision_sent = [r.requests[0].image.content for r in vision.requests()]
    embedded = [embedded_bytes(r) for r in vertex.predict_requests()]
    # Vision reads WebP: sent as uploaded.
    assert small_webp in vision_sent
    (large_sent,) = (content for content in vision_sent if content != small_webp)
    assert large_sent != large
    with Image.open(io.BytesIO(large_sent)) as sent:
        assert sent.format == "JPEG"
        assert sent.width * sent.height <= 20_000
        assert abs(sent.width / sent.height - 320 / 240) < 0.02
    # The embeddings get the downscaled JPEG, and the WebP converted (same size).
    assert large_sent in embedded
    (converted_bytes,) = (content for content in embedded if content != large_sent)
    with Image.open(io.BytesIO(converted_bytes)) as converted:
        assert converted.format in ("JPEG", "PNG")
        assert converted.size == (100, 75)


class SlotsTaken:
    """The worker's rate limits reduced to what this test looks at: the slots asked for, in
    order, each granted at once."""

    def __init__(self) -> None:
        self.apis: list[str] = []

    async def acquire(self, api: str) -> None:
        self.apis.append(api)


def truncated(content: bytes) -> bytes:
    """The first half: its header reads, its pixels do not decode."""
    return content[: len(content) // 2]


@pytest.mark.parametrize(
    ("content", "content_type", "overrides", "slots"),
    [
        # Over the pixel limit: downscaled for Vision.
        (truncated(jpeg_bytes(seed=22)), "image/jpeg", {"max_image_pixels": 20_000}, []),
        # Sent to Vision as it is; converted for the embeddings.
        (truncated(encode(photo(23), "TIFF")), "image/tiff", {}, ["vision"]),
        # Sent to Vision and the embeddings as it is; converted for Gemini.
        (
            truncated(encode(photo(24), "BMP")),
            "image/bmp",
            {"refine_tags": True},
            ["vision", "embeddings"],
        ),
    ],
    ids=["vision", "embeddings", "gemini"],
)
async def test_each_image_is_re_encoded_before_its_calls_rate_limit_slot(
    vision: FakeVision,
    vertex: FakeVertex,
    content: bytes,
    content_type: str,
    overrides: Mapping[str, object],
    slots: list[str],
) -> None:
    """A call must follow its slot at once. The embeddings' image used to be re-encoded
    after their slot (seconds for a large one), so their calls went late and bunched up past
    the limit with the next ones. Here the re-encoding fails: no slot was taken for it."""
    analyzer = GoogleAnalyzer(google_config(vision, vertex, **overrides))
    taken = SlotsTaken()
    item = AnalysisInput("media-1", content, content_type, hashlib.sha256(content).hexdigest())
    try:
        with pytest.raises(PermanentAnalyzerError, match="truncated"):
            await analyzer.analyze(item, taken)
    finally:
        await analyzer.aclose()

    assert taken.apis == slots
    # Every slot taken was used by its call.
    assert len(vision.calls(ANNOTATE)) == slots.count("vision")
    assert len(vertex.calls(PREDICT)) == slots.count("embeddings")
    assert vertex.calls(GENERATE) == []


# ---- the parts ----


def test_fit_shrinks_to_the_byte_limit_and_keeps_transparency() -> None:
    image = open_upload(jpeg_bytes(seed=11, size=(320, 240), quality=95), "image/jpeg")
    limit = len(image.content) // 4
    fitted = fit(image, VISION_TYPES, ImageLimits(max_bytes=limit, max_pixels=10**9))
    assert len(fitted.content) <= limit
    assert fitted.mime_type == "image/jpeg"
    assert fitted.width < 320

    # Rotated by its EXIF orientation (6: 90 degrees), decoded at 1/2 scale by libjpeg's draft.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = open_upload(encode(photo(13, (640, 480)), "JPEG", exif=exif), "image/jpeg")
    upright = fit(rotated, VISION_TYPES, ImageLimits(max_bytes=10**8, max_pixels=20_000))
    assert upright.width < upright.height
    assert 18_000 < upright.width * upright.height <= 20_000

    rgba = photo(12, (64, 48)).convert("RGBA")
    rgba.putalpha(128)
    tiff = open_upload(encode(rgba, "TIFF"), "image/tiff")
    converted = fit(tiff, EMBEDDING_TYPES, ImageLimits(max_bytes=10**8, max_pixels=10**9))
    assert converted.mime_type == "image/png"
    with Image.open(io.BytesIO(converted.content)) as decoded:
        assert decoded.mode == "RGBA"
        assert decoded.size == (64, 48)


def test_fit_with_googles_limits_downscales_a_76_megapixel_image() -> None:
    # Grayscale and flat: the cheapest 76-megapixel JPEG to make and resize.
    big = Image.new("L", (10_000, 7_600), 90)
    content = encode(big, "JPEG", quality=80)
    del big
    image = open_upload(content, "image/jpeg")
    fitted = fit(image, VISION_TYPES, ImageLimits(max_bytes=20_000_000, max_pixels=75_000_000))
    assert fitted.mime_type == "image/jpeg"
    assert 70_000_000 < fitted.width * fitted.height <= 75_000_000
    assert len(fitted.content) <= 20_000_000


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("Men's fade haircut", "mens-fade-haircut"),
        ("  Café  Crème ", "cafe-creme"),
        ("T-shirt / Top", "t-shirt-top"),
        ("Hair", "hair"),
        ("!!!", ""),
    ],
)
def test_tags_are_normalised(text: str, tag: str) -> None:
    assert normalise(text) == tag


@pytest.mark.parametrize(
    ("answer", "tags"),
    [
        ('{"tags": ["Mid fade", "mid-fade", "Crop"]}', ["mid-fade", "crop"]),
        ('```json\n{"tags": ["Crop"]}\n```', ["crop"]),
        ('["Crop", "Fade"]', ["crop", "fade"]),
        ("Sure! hair, fade", None),
        ('{"tags": "hair"}', None),
        ('{"tags": [1, 2]}', None),
        ("", None),
    ],
)
def test_gemini_answers_are_parsed_or_refused(answer: str, tags: list[str] | None) -> None:
    assert parse_refined(answer) == tags


def _with_retry_info(seconds: float) -> api_exceptions.ResourceExhausted:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))
    )
    return api_exceptions.ResourceExhausted("quota", details=[info])


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (api_exceptions.ResourceExhausted("quota"), QuotaExceeded, "QUOTA_EXCEEDED"),
        (api_exceptions.DeadlineExceeded("slow"), TransientAnalyzerError, "ANALYZER_TIMEOUT"),
        (api_exceptions.ServiceUnavailable("down"), TransientAnalyzerError, "ANALYZER_UNAVAILABLE"),
        (
            api_exceptions.InternalServerError("oops"),
            TransientAnalyzerError,
            "ANALYZER_UNAVAILABLE",
        ),
        (api_exceptions.Aborted("conflict"), TransientAnalyzerError, "ANALYZER_UNAVAILABLE"),
        (api_exceptions.Unknown("?"), TransientAnalyzerError, "ANALYZER_UNAVAILABLE"),
        (api_exceptions.InvalidArgument("bad"), PermanentAnalyzerError, "ANALYZER_REJECTED"),
        (api_exceptions.FailedPrecondition("no"), PermanentAnalyzerError, "ANALYZER_REJECTED"),
        (api_exceptions.PermissionDenied("api off"), PermanentAnalyzerError, "ANALYZER_REJECTED"),
        (api_exceptions.Unauthenticated("who"), PermanentAnalyzerError, "ANALYZER_REJECTED"),
        (api_exceptions.NotFound("model"), PermanentAnalyzerError, "ANALYZER_REJECTED"),
        (api_exceptions.MethodNotImplemented("x"), PermanentAnalyzerError, "ANALYZER_REJECTED"),
        (auth_exceptions.TransportError("net"), TransientAnalyzerError, "ANALYZER_UNAVAILABLE"),
        (auth_exceptions.RefreshError("revoked"), PermanentAnalyzerError, "CREDENTIALS_REFUSED"),
    ],
)
def test_errors_are_classified(error: Exception, kind: type[Exception], reason: str) -> None:
    classified = classify("vision", error, timeout=2.0)
    assert type(classified) is kind
    assert classified.reason == reason
    assert classified.transient is (kind is not PermanentAnalyzerError)


def test_a_quota_error_carries_its_retry_delay() -> None:
    classified = classify("embeddings", _with_retry_info(2.5), timeout=2.0)
    assert isinstance(classified, QuotaExceeded)
    assert (classified.api, classified.retry_after) == ("embeddings", 2.5)
    plain = classify("embeddings", api_exceptions.ResourceExhausted("quota"), timeout=2.0)
    assert isinstance(plain, QuotaExceeded)
    assert plain.retry_after is None


def test_default_limits_and_cache_inputs(vision: FakeVision, vertex: FakeVertex) -> None:
    plain = GoogleAnalyzer(google_config(vision, vertex))
    assert [(limit.api, limit.rate_per_second, limit.burst) for limit in plain.api_limits] == [
        ("vision", 2.0, 1),
        ("embeddings", 2.0, 1),
    ]
    refining = GoogleAnalyzer(google_config(vision, vertex, refine_tags=True))
    assert [limit.api for limit in refining.api_limits] == ["vision", "embeddings", "gemini"]

    # Without Gemini the category and context change nothing; with it they are inputs.
    assert plain.cache_inputs("Hair", {"a": "1"}) == plain.cache_inputs("Nails", {})
    assert refining.cache_inputs("Hair", {"a": "1"}) != refining.cache_inputs("Nails", {})
    other_model = GoogleAnalyzer(
        google_config(vision, vertex, embedding_model="multimodalembedding@002")
    )
    assert other_model.cache_inputs("Hair", {}) != plain.cache_inputs("Hair", {})
    assert plain.cache_inputs("Hair", {})["embedding_model"] == "multimodalembedding@001"
    other_gemini = GoogleAnalyzer(
        google_config(vision, vertex, refine_tags=True, gemini_model="gemini-2.5-pro")
    )
    assert other_gemini.cache_inputs("Hair", {}) != refining.cache_inputs("Hair", {})


def test_missing_credentials_say_how_to_set_them_up() -> None:
    # GOOGLE_APPLICATION_CREDENTIALS names a missing file (the autouse fixture).
    config = GoogleConfig(project=PROJECT)
    with pytest.raises(RuntimeError, match="gcloud auth application-default login"):
        GoogleAnalyzer(config)


def test_without_the_google_extra_the_analyser_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if google-cloud-vision were not installed: its import fails.
    monkeypatch.setitem(sys.modules, "google.cloud.vision_v1", None)
    monkeypatch.delattr(google.cloud, "vision_v1")
    for module in (
        "analysis_service.analyzers.google",
        "analysis_service.analyzers.google_clients",
    ):
        monkeypatch.delitem(sys.modules, module)
    config = AnalysisConfig(analyzer="google", google=GoogleConfig(project=PROJECT))
    with pytest.raises(RuntimeError, match=r"pip install 'mediatag\[google\]'"):
        build_analyzer(config)


# ---- configuration ----


def analysis_settings(argv: list[str], environ: dict[str, str]) -> AnalysisConfig:
    args: argparse.Namespace = build_parser().parse_args(["serve", "analysis", *argv])
    settings = serve_settings(args, ["analysis"], environ)
    assert settings.analysis is not None
    return settings.analysis


def test_google_settings_from_flags_and_environment() -> None:
    config = analysis_settings(
        ["--gcp-project", "flag-project", "--refine-tags", "--min-label-score", "0.8"],
        {
            "MEDIATAG_ANALYZER": "google",
            "MEDIATAG_GCP_PROJECT": "env-project",
            "MEDIATAG_GCP_LOCATION": "europe-west4",
            "MEDIATAG_VISION_ENDPOINT": "127.0.0.1:9001",
            "MEDIATAG_VERTEX_ENDPOINT": "127.0.0.1:9002",
            "MEDIATAG_GOOGLE_INSECURE": "1",
            "MEDIATAG_GEMINI_MODEL": "gemini-2.5-pro",
            "MEDIATAG_GOOGLE_TIMEOUT": "7.5",
        },
    )
    assert config.analyzer == "google"
    google = config.google
    assert (google.project, google.location) == ("flag-project", "europe-west4")
    assert (google.vision_endpoint, google.vertex_endpoint) == ("127.0.0.1:9001", "127.0.0.1:9002")
    assert google.insecure is True
    assert google.refine_tags is True
    assert google.gemini_model == "gemini-2.5-pro"
    assert google.min_score == 0.8
    assert google.request_timeout == 7.5

    defaults = analysis_settings([], {"MEDIATAG_ANALYZER": "google", "MEDIATAG_GCP_PROJECT": "p"})
    assert defaults.google.insecure is False
    assert defaults.google.vision_endpoint == "vision.googleapis.com:443"
    assert defaults.google.resolved_vertex_endpoint == "us-central1-aiplatform.googleapis.com:443"
    assert defaults.google.embedding_model == "multimodalembedding@001"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MEDIATAG_ANALYZER": "google"}, "needs a Google Cloud project"),
        (
            {
                "MEDIATAG_ANALYZER": "google",
                "MEDIATAG_GCP_PROJECT": "p",
                "MEDIATAG_GOOGLE_INSECURE": "1",
            },
            "not for Google's endpoint vision.googleapis.com:443",
        ),
        (
            {
                "MEDIATAG_ANALYZER": "google",
                "MEDIATAG_GCP_PROJECT": "p",
                "MEDIATAG_GOOGLE_INSECURE": "1",
                "MEDIATAG_VISION_ENDPOINT": "127.0.0.1:9001",
            },
            "not for Google's endpoint us-central1-aiplatform.googleapis.com:443",
        ),
        (
            {
                "MEDIATAG_ANALYZER": "google",
                "MEDIATAG_GCP_PROJECT": "p",
                "MEDIATAG_EMBEDDING_DIMENSIONS": "100",
            },
            "not 100",
        ),
        ({"MEDIATAG_GOOGLE_INSECURE": "maybe"}, "MEDIATAG_GOOGLE_INSECURE"),
    ],
)
def test_google_settings_that_cannot_work_are_refused(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        analysis_settings([], environ)


def test_the_local_analyser_needs_no_google_settings() -> None:
    assert analysis_settings([], {}).analyzer == "local"
