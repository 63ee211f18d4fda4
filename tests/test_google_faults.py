"""The google analyser when Google's side misbehaves: refused credentials, odd answers, images
Pillow would convert wrongly. The real clients against the fakes of ``tests/google_fakes.py``.
"""

# Its imports follow the check that skips it without the `google` extra.
# ruff: noqa: E402

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Cluster, skip_without_google_extra

skip_without_google_extra()

import grpc
from google.cloud.aiplatform_v1.types import prediction_service
from google.rpc import code_pb2
from mediatag.ingest.v1 import ingest_pb2 as ipb
from PIL import Image

from analysis_service.analyzers.google_clients import MAX_ANSWER_BYTES, GoogleClients
from analysis_service.analyzers.google_images import (
    EMBEDDING_TYPES,
    GEMINI_TYPES,
    ImageLimits,
    fit,
    open_upload,
)
from analysis_service.analyzers.google_tags import MAX_REFINED_ANSWER_CHARS, parse_refined
from analysis_service.config import RateLimitConfig, RetryPolicy
from analysis_service.errors import TransientAnalyzerError
from tests.google_fakes import (
    ANNOTATE,
    GENERATE,
    PREDICT,
    FakeTokenEndpoint,
    FakeVertex,
    FakeVision,
    Fault,
    service_account_key,
)
from tests.media_samples import encode, jpeg_bytes
from tests.test_google_analyzer import (
    FAST,
    VECTOR,
    VISION_TAGS,
    google_config,
    job,
    no_application_default_credentials,
    start_cluster,
    upload,
    vertex,
    vision,
)
from tests.test_pipeline import wait_terminal

# Fixtures used here by name (the autouse one keeps ADC lookups off the network).
__all__ = ["no_application_default_credentials", "vertex", "vision"]


@pytest.fixture
def token_endpoint() -> Iterator[FakeTokenEndpoint]:
    endpoint = FakeTokenEndpoint()
    yield endpoint
    endpoint.stop()


def use_service_account_key(monkeypatch: pytest.MonkeyPatch, key_dir: Path, token_uri: str) -> None:
    """Application Default Credentials: a service account key refreshed at ``token_uri``."""
    key_file = key_dir / "key.json"
    key_file.write_text(json.dumps(service_account_key(token_uri)))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---- credentials ----


async def test_refused_credentials_fail_the_job_at_once_saying_so(
    make_cluster: Callable[..., Cluster],
    vision: FakeVision,
    vertex: FakeVertex,
    token_endpoint: FakeTokenEndpoint,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    use_service_account_key(monkeypatch, tmp_path, token_endpoint.url)
    cluster = await start_cluster(make_cluster, google_config(vision, vertex, insecure=False))
    (media_id,) = await upload(cluster, jpeg_bytes(seed=201))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_FAILED
    assert media.attempt == 1
    assert media.error.reason == "CREDENTIALS_REFUSED"
    assert "vision: credentials refused: invalid_grant: Invalid JWT Signature." in (
        media.error.message
    )
    (attempt,) = (await job(cluster, media_id)).attempts
    assert attempt.error.transient is False
    assert len(token_endpoint.grants) == 1
    # Refused before the call: nothing reached Google.
    assert vision.calls(ANNOTATE) == []


async def test_a_token_endpoint_out_of_reach_is_transient_and_says_so(
    vision: FakeVision, vertex: FakeVertex, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_service_account_key(monkeypatch, tmp_path, f"http://127.0.0.1:{closed_port()}/token")
    clients = GoogleClients(google_config(vision, vertex, insecure=False), len(VECTOR))
    try:
        with pytest.raises(TransientAnalyzerError) as raised:
            await clients.annotate(open_upload(jpeg_bytes(seed=202), "image/jpeg"))
    finally:
        await clients.aclose()
    assert raised.value.reason == "ANALYZER_UNAVAILABLE"
    assert raised.value.message.startswith("vision: credentials could not be refreshed: ")
    assert vision.calls(ANNOTATE) == []


# ---- images Pillow would clip or truncate ----


def _gradient_16_bit() -> Image.Image:
    row = np.linspace(0, 65535, 256, dtype=np.uint16)
    return Image.fromarray(np.tile(row, (64, 1)))


@pytest.mark.parametrize(
    ("image", "mean"),
    [
        pytest.param(_gradient_16_bit(), 127.5, id="16-bit-gradient"),
        pytest.param(Image.new("F", (64, 64), 0.5), 128.0, id="float-half"),
        pytest.param(Image.new("I", (64, 64), 16384), 64.0, id="32-bit-quarter"),
    ],
)
def test_16_bit_and_float_images_keep_their_brightness_when_converted(
    image: Image.Image, mean: float
) -> None:
    tiff = open_upload(encode(image, "TIFF"), "image/tiff")
    for accepted in (EMBEDDING_TYPES, GEMINI_TYPES):
        converted = fit(tiff, accepted, ImageLimits(max_bytes=10**8, max_pixels=10**9))
        assert converted.mime_type == "image/jpeg"
        with Image.open(io.BytesIO(converted.content)) as decoded:
            assert decoded.mode == "L"
            assert abs(float(np.asarray(decoded).mean()) - mean) < 2.0


# ---- Gemini's answers ----


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param("[" * 5_000, id="nested-deeper-than-the-parser-goes"),
        pytest.param(
            json.dumps({"tags": ["hair"] * (MAX_REFINED_ANSWER_CHARS // 8)}), id="over-long"
        ),
    ],
)
def test_gemini_answers_too_deep_or_too_long_are_refused(answer: str) -> None:
    assert parse_refined(answer) is None


async def test_a_deeply_nested_gemini_answer_keeps_visions_tags(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vertex.answers = ["[" * 100_000]
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex, refine_tags=True),
        rate_limits={**FAST, "gemini": RateLimitConfig(50)},
    )
    (media_id,) = await upload(cluster, jpeg_bytes(seed=203))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_COMPLETED, media.error
    assert media.attempt == 1
    assert list(media.tags) == VISION_TAGS
    assert len(vertex.calls(GENERATE)) == 1


async def test_a_gemini_answer_over_the_size_limit_is_not_read_and_keeps_visions_tags(
    vision: FakeVision, vertex: FakeVertex
) -> None:
    vertex.answers = ["x" * (MAX_ANSWER_BYTES + 1)]
    clients = GoogleClients(google_config(vision, vertex), len(VECTOR))
    try:
        answer = await clients.refine(open_upload(jpeg_bytes(seed=204), "image/jpeg"), "tags?")
    finally:
        await clients.aclose()
    assert answer is None
    assert len(vertex.calls(GENERATE)) == 1


# ---- errors and answers of Vision and the embeddings ----


async def test_a_vision_image_error_unknown_is_transient(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vision.image_error = (code_pb2.UNKNOWN, "Internal error, try again")
    cluster = await start_cluster(
        make_cluster,
        google_config(vision, vertex),
        retry=RetryPolicy(max_attempts=2, backoff_base=0.05),
    )
    (media_id,) = await upload(cluster, jpeg_bytes(seed=205))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_FAILED
    assert media.attempt == 2
    assert media.error.reason == "ANALYZER_UNAVAILABLE"
    assert "Internal error, try again (UNKNOWN)" in media.error.message
    assert len(vision.calls(ANNOTATE)) == 2


async def test_a_deadline_the_server_sends_is_reported_as_the_server_said(
    make_cluster: Callable[..., Cluster], vision: FakeVision, vertex: FakeVertex
) -> None:
    vision.fail_next(
        ANNOTATE, Fault(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded on backend")
    )
    cluster = await start_cluster(make_cluster, google_config(vision, vertex))
    (media_id,) = await upload(cluster, jpeg_bytes(seed=206))
    (media,) = await wait_terminal(cluster, [media_id])

    assert media.status == ipb.PROCESSING_STATUS_COMPLETED, media.error
    assert media.attempt == 2
    first = (await job(cluster, media_id)).attempts[0]
    assert (first.error.reason, first.error.transient) == ("ANALYZER_TIMEOUT", True)
    assert "Deadline exceeded on backend" in first.error.message
    # Answered at once: our own deadline (5 s) did not run out.
    assert "within" not in first.error.message


class FakeVertexWithoutPredictions(FakeVertex):
    """Answers its first ``Predict`` with no prediction at all, then as ``FakeVertex``."""

    async def _predict(
        self,
        request: prediction_service.PredictRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> prediction_service.PredictResponse:
        if self.calls(PREDICT):
            return await super()._predict(request, context)
        await self._arrive(PREDICT, request, context)
        return prediction_service.PredictResponse()


async def test_no_prediction_is_retried_and_a_wrong_dimension_fails_at_once(
    make_cluster: Callable[..., Cluster], vision: FakeVision
) -> None:
    empty_first = FakeVertexWithoutPredictions(vector=VECTOR)
    await empty_first.start()
    try:
        cluster = await start_cluster(make_cluster, google_config(vision, empty_first))
        (retried_id,) = await upload(cluster, jpeg_bytes(seed=207))
        (retried,) = await wait_terminal(cluster, [retried_id])
        assert retried.status == ipb.PROCESSING_STATUS_COMPLETED, retried.error
        assert retried.attempt == 2
        first = (await job(cluster, retried_id)).attempts[0]
        assert (first.error.reason, first.error.transient) == ("ANALYZER_UNAVAILABLE", True)
        assert "expected 1 prediction, got 0" in first.error.message

        # A model answering 512 numbers where 1408 are configured: every attempt would.
        empty_first.vector = VECTOR[:512]
        (wrong_id,) = await upload(cluster, jpeg_bytes(seed=208))
        (wrong,) = await wait_terminal(cluster, [wrong_id])
        assert wrong.status == ipb.PROCESSING_STATUS_FAILED
        assert wrong.attempt == 1
        assert wrong.error.reason == "INVALID_UPSTREAM_RESPONSE"
        assert "512 dimensions, expected 1408" in wrong.error.message
    finally:
        await empty_first.stop()
