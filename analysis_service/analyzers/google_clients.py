"""The wire side of the ``google`` analyser: Cloud Vision and Vertex AI through Google's clients.

Each call passes our own ``timeout`` and ``retry=None``: the libraries' default retry can hold
a call for minutes, and our queue's retry policy decides instead. Errors are classified here,
in one place:

- ``ResourceExhausted`` (quota, 429) -> :class:`QuotaExceeded` for that API, with the delay of
  the ``google.rpc.RetryInfo`` it carries, if any: the API's limiter pauses, the attempt does
  not count;
- ``ServiceUnavailable``, ``DeadlineExceeded``, ``InternalServerError`` and other
  server-side failures, and credentials that could not be refreshed for now (the token
  endpoint unreachable or failing) -> :class:`TransientAnalyzerError` (retried with backoff);
- ``InvalidArgument`` and other refusals of the request itself, and a per-image error inside
  Vision's response -> :class:`PermanentAnalyzerError` (fails at once, with the reason);
  credentials the token endpoint refuses (revoked, deleted key) too, as ``CREDENTIALS_REFUSED``.

Clients are made on first use, on the running event loop, on channels made here. With
``insecure`` they talk plaintext to an emulator with no credentials; otherwise TLS with
Application Default Credentials, which are refreshed here before a call when they are due
(see :meth:`GoogleClients._fresh_credentials`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import google.auth
import google.auth.transport.grpc
import google.auth.transport.requests
import grpc
import numpy as np
import numpy.typing as npt
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import Credentials, TokenState
from google.cloud import vision_v1
from google.cloud.aiplatform_v1.services.prediction_service import (
    PredictionServiceAsyncClient,
)
from google.cloud.aiplatform_v1.services.prediction_service.transports.grpc_asyncio import (
    PredictionServiceGrpcAsyncIOTransport,
)
from google.cloud.aiplatform_v1.types import content as gemini_content
from google.cloud.aiplatform_v1.types import openapi, prediction_service
from google.cloud.vision_v1.services.image_annotator import ImageAnnotatorAsyncClient
from google.cloud.vision_v1.services.image_annotator.transports import (
    ImageAnnotatorGrpcAsyncIOTransport,
)
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, error_details_pb2

from analysis_service.analyzers.google_images import UploadImage
from analysis_service.analyzers.google_tags import Colour, Scored, VisionFindings
from analysis_service.config import GoogleConfig
from analysis_service.errors import (
    AnalyzerFailure,
    PermanentAnalyzerError,
    QuotaExceeded,
    TransientAnalyzerError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

VISION = "vision"
EMBEDDINGS = "embeddings"
GEMINI = "gemini"

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# A reason of its own: the operator must renew the credentials, Google is not at fault.
CREDENTIALS_REFUSED = "CREDENTIALS_REFUSED"
# An answer that is not what was asked for (an embedding of the configured dimension).
INVALID_UPSTREAM_RESPONSE = "INVALID_UPSTREAM_RESPONSE"
# Answers are a few KB (an embedding of 1408 numbers, labels, a JSON list of tags): one over
# this is refused by gRPC instead of being read whole into memory.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# How gRPC words its own refusal of an answer over the limit, as RESOURCE_EXHAUSTED: recognised
# so it is not taken for a quota (it has no other mark; should the wording change, such an
# answer is put off as a quota refusal would be, at most 100 times, and fails).
_ANSWER_TOO_LARGE = "Received message larger than max"
# A 20 MB image is ~27 MB in base64 inside the embeddings request: no gRPC limit on sending.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
]
# gRPC's timers and the event loop's clock may disagree by a few milliseconds on when our
# deadline ran out.
_DEADLINE_SLACK = 0.05
_SAFE_SEARCH_CATEGORIES = ("adult", "spoof", "medical", "violence", "racy")

# Refusals of the request itself (HTTP 400, 401, 403, 404, 409 AlreadyExists, 501): the same
# request would be refused again. Everything else from the server is worth another attempt.
_PERMANENT = (
    api_exceptions.BadRequest,  # InvalidArgument, FailedPrecondition, OutOfRange
    api_exceptions.Unauthorized,  # Unauthenticated
    api_exceptions.Forbidden,  # PermissionDenied (e.g. the API is not enabled)
    api_exceptions.NotFound,  # e.g. an unknown model
    api_exceptions.AlreadyExists,
    api_exceptions.MethodNotImplemented,  # e.g. an endpoint that is not this API
)
# Per-image error codes inside Vision's response that are worth another attempt, as the
# exceptions of the same codes are.
_TRANSIENT_CODES = frozenset(
    {
        code_pb2.UNAVAILABLE,
        code_pb2.INTERNAL,
        code_pb2.UNKNOWN,
        code_pb2.DEADLINE_EXCEEDED,
        code_pb2.ABORTED,
    }
)


def application_default_credentials() -> Credentials:
    """ADC: ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``,
    or the attached service account on Google Cloud; a ``RuntimeError`` saying so otherwise."""
    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except auth_exceptions.DefaultCredentialsError as exc:
        raise RuntimeError(
            "the google analyser found no Application Default Credentials: run "
            "`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
            f"to a service account key file ({exc})"
        ) from exc
    return credentials


def classify(api: str, exc: Exception, timeout: float | None) -> AnalyzerFailure:
    """The analyser error for a failed call to ``api``; ``timeout`` is the call's deadline in
    seconds when it ran out, None when the call ended before it."""
    message = getattr(exc, "message", None) or str(exc)
    text = f"{api}: {type(exc).__name__}: {message}"
    if isinstance(exc, api_exceptions.ResourceExhausted) and _ANSWER_TOO_LARGE in message:
        return PermanentAnalyzerError(
            f"{api}: an answer over {MAX_ANSWER_BYTES >> 20} MiB: {message}",
            reason=INVALID_UPSTREAM_RESPONSE,
        )
    if isinstance(exc, api_exceptions.ResourceExhausted):
        return QuotaExceeded(
            f"{api}: quota exceeded: {message}", api=api, retry_after=retry_delay(exc)
        )
    if isinstance(exc, api_exceptions.DeadlineExceeded):
        # Our deadline, or one the server gave up on by itself: say which.
        return TransientAnalyzerError(
            text if timeout is None else f"{api}: no answer within {timeout:g} s",
            reason="ANALYZER_TIMEOUT",
        )
    if isinstance(exc, _PERMANENT):
        return PermanentAnalyzerError(text)
    if isinstance(exc, auth_exceptions.GoogleAuthError):
        # google-auth's errors carry the token endpoint's answer as a second argument.
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else message
        if isinstance(exc, auth_exceptions.TransportError) or getattr(exc, "retryable", False):
            return TransientAnalyzerError(f"{api}: credentials could not be refreshed: {detail}")
        # Credentials that cannot be refreshed (revoked, wrong key) stay that way.
        return PermanentAnalyzerError(
            f"{api}: credentials refused: {detail}", reason=CREDENTIALS_REFUSED
        )
    # ServiceUnavailable, InternalServerError, Aborted, Unknown, network trouble...
    return TransientAnalyzerError(text)


def retry_delay(exc: api_exceptions.GoogleAPICallError) -> float | None:
    """The ``google.rpc.RetryInfo`` delay an error carries, in seconds, if any."""
    for detail in exc.details:
        if isinstance(detail, error_details_pb2.RetryInfo) and detail.HasField("retry_delay"):
            delay = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
            return delay if delay > 0 else None
    return None


class GoogleClients:
    """Vision's ``ImageAnnotatorAsyncClient`` and Vertex AI's ``PredictionServiceAsyncClient``."""

    def __init__(self, config: GoogleConfig, embedding_dimensions: int) -> None:
        self._config = config
        self._dimensions = embedding_dimensions
        self._credentials = None if config.insecure else application_default_credentials()
        # Refreshes the credentials, here and in the channels' credentials plugin.
        self._auth_request = google.auth.transport.requests.Request()
        self._refreshing = asyncio.Lock()
        self._vision: ImageAnnotatorAsyncClient | None = None
        self._prediction: PredictionServiceAsyncClient | None = None
        location = f"projects/{config.project}/locations/{config.location}"
        self.embedding_model_path = f"{location}/publishers/google/models/{config.embedding_model}"
        self.gemini_model_path = f"{location}/publishers/google/models/{config.gemini_model}"

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        """Our own channel rather than the library's: ours bounds the answers' size, and
        authenticates with ``self._credentials``, the object :meth:`_fresh_credentials`
        refreshes."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        plugin = google.auth.transport.grpc.AuthMetadataPlugin(  # type: ignore[no-untyped-call]
            self._credentials, self._auth_request
        )
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(), grpc.metadata_call_credentials(plugin)
        )
        return grpc.aio.secure_channel(endpoint, credentials, options=_CHANNEL_OPTIONS)

    def _vision_client(self) -> ImageAnnotatorAsyncClient:
        if self._vision is None:
            endpoint = self._config.vision_endpoint
            self._vision = ImageAnnotatorAsyncClient(
                transport=ImageAnnotatorGrpcAsyncIOTransport(
                    host=endpoint, channel=self._channel(endpoint)
                )
            )
        return self._vision

    def _prediction_client(self) -> PredictionServiceAsyncClient:
        if self._prediction is None:
            endpoint = self._config.resolved_vertex_endpoint
            self._prediction = PredictionServiceAsyncClient(
                transport=PredictionServiceGrpcAsyncIOTransport(
                    host=endpoint, channel=self._channel(endpoint)
                )
            )
        return self._prediction

    async def aclose(self) -> None:
        """Close the clients' channels."""
        vision, prediction = self._vision, self._prediction
        self._vision = self._prediction = None
        # The transports' close() is not annotated.
        if vision is not None:
            await vision.transport.close()  # type: ignore[no-untyped-call]
        if prediction is not None:
            await prediction.transport.close()  # type: ignore[no-untyped-call]

    async def _fresh_credentials(self) -> None:
        """Refresh the credentials when they are due, before a call: left to the channel's
        credentials plugin, a refresh that fails is reported by gRPC as UNAVAILABLE whatever
        the cause, and revoked credentials would look like Google being down."""
        credentials = self._credentials
        if credentials is None or credentials.token_state is TokenState.FRESH:
            return
        async with self._refreshing:
            # Concurrent calls wait for one refresh; the plugin then finds the token fresh.
            if credentials.token_state is not TokenState.FRESH:
                await asyncio.to_thread(credentials.refresh, self._auth_request)

    async def _call(self, api: str, start: Callable[[], Awaitable[T]]) -> T:
        """``start()``'s answer, its failure classified for ``api``."""
        try:
            await self._fresh_credentials()
        except auth_exceptions.GoogleAuthError as exc:
            raise classify(api, exc, None) from exc
        timeout = self._config.request_timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await start()
        except api_exceptions.GoogleAPICallError as exc:
            ran_out = loop.time() - started >= timeout - _DEADLINE_SLACK
            raise classify(api, exc, timeout if ran_out else None) from exc

    # ---- Cloud Vision ----

    def vision_request(self, image: UploadImage) -> vision_v1.BatchAnnotateImagesRequest:
        feature = vision_v1.Feature.Type
        config = self._config
        return vision_v1.BatchAnnotateImagesRequest(
            requests=[
                vision_v1.AnnotateImageRequest(
                    image=vision_v1.Image(content=image.content),
                    features=[
                        vision_v1.Feature(
                            type_=feature.LABEL_DETECTION, max_results=config.max_labels
                        ),
                        vision_v1.Feature(
                            type_=feature.OBJECT_LOCALIZATION, max_results=config.max_objects
                        ),
                        vision_v1.Feature(type_=feature.IMAGE_PROPERTIES),
                        vision_v1.Feature(type_=feature.SAFE_SEARCH_DETECTION),
                    ],
                )
            ]
        )

    async def annotate(self, image: UploadImage) -> VisionFindings:
        """Labels, objects, dominant colours and safe search of one image."""
        response = await self._call(
            VISION,
            lambda: self._vision_client().batch_annotate_images(
                request=self.vision_request(image),
                timeout=self._config.request_timeout,
                retry=None,
            ),
        )
        if len(response.responses) != 1:
            raise TransientAnalyzerError(
                f"vision: expected 1 response, got {len(response.responses)}"
            )
        found = response.responses[0]
        if found.error.code != code_pb2.OK:
            raise _image_error(found.error.code, found.error.message)
        safe_search = found.safe_search_annotation
        return VisionFindings(
            labels=[Scored(a.description, a.score) for a in found.label_annotations],
            objects=[Scored(o.name, o.score) for o in found.localized_object_annotations],
            colours=[
                Colour(c.color.red, c.color.green, c.color.blue, c.pixel_fraction)
                for c in found.image_properties_annotation.dominant_colors.colors
            ],
            safe_search={
                category: vision_v1.Likelihood(getattr(safe_search, category)).name
                for category in _SAFE_SEARCH_CATEGORIES
            },
        )

    # ---- Vertex AI multimodal embeddings ----

    def embedding_request(self, image: UploadImage) -> prediction_service.PredictRequest:
        instance = struct_pb2.Value()
        instance.struct_value.update(
            {"image": {"bytesBase64Encoded": base64.b64encode(image.content).decode("ascii")}}
        )
        parameters = struct_pb2.Value()
        parameters.struct_value.update({"dimension": self._dimensions})
        # Built as the protobuf message: proto-plus does not take Values in a repeated field.
        request: prediction_service.PredictRequest = prediction_service.PredictRequest.wrap(
            prediction_service.PredictRequest.pb()(
                endpoint=self.embedding_model_path, instances=[instance], parameters=parameters
            )
        )
        return request

    async def embed(self, image: UploadImage) -> npt.NDArray[np.float32]:
        """The image's embedding, L2-normalised."""
        response = await self._call(
            EMBEDDINGS,
            lambda: self._prediction_client().predict(
                request=self.embedding_request(image),
                timeout=self._config.request_timeout,
                retry=None,
            ),
        )
        predictions = prediction_service.PredictResponse.pb(response).predictions
        if len(predictions) != 1:
            # A glitch (one image asked for, one prediction it answers), not the image's fault.
            raise TransientAnalyzerError(
                f"embeddings: expected 1 prediction, got {len(predictions)}"
            )
        answer = json_format.MessageToDict(predictions[0])
        return _unit_vector(answer.get("imageEmbedding"), self._dimensions)

    # ---- Gemini ----

    def refine_request(
        self, image: UploadImage, prompt: str
    ) -> prediction_service.GenerateContentRequest:
        schema = openapi.Schema(
            type_=openapi.Type.OBJECT,
            properties={
                "tags": openapi.Schema(
                    type_=openapi.Type.ARRAY, items=openapi.Schema(type_=openapi.Type.STRING)
                )
            },
            required=["tags"],
        )
        return prediction_service.GenerateContentRequest(
            model=self.gemini_model_path,
            contents=[
                gemini_content.Content(
                    role="user",
                    parts=[
                        gemini_content.Part(
                            inline_data=gemini_content.Blob(
                                mime_type=image.mime_type, data=image.content
                            )
                        ),
                        gemini_content.Part(text=prompt),
                    ],
                )
            ],
            generation_config=gemini_content.GenerationConfig(
                temperature=0.2, response_mime_type="application/json", response_schema=schema
            ),
        )

    async def refine(self, image: UploadImage, prompt: str) -> str | None:
        """Gemini's answer text, or None when it gave no candidate (e.g. blocked) or one over
        the size limit."""
        try:
            response = await self._call(
                GEMINI,
                lambda: self._prediction_client().generate_content(
                    request=self.refine_request(image, prompt),
                    timeout=self._config.request_timeout,
                    retry=None,
                ),
            )
        except PermanentAnalyzerError as exc:
            if exc.reason != INVALID_UPSTREAM_RESPONSE:
                raise
            # A runaway answer, like any other that is not the JSON asked for.
            logger.warning("%s; keeping Vision's tags", exc.message)
            return None
        if not response.candidates:
            logger.warning(
                "Gemini gave no answer (%s); keeping Vision's tags",
                response.prompt_feedback.block_reason_message or "no candidates",
            )
            return None
        parts: Sequence[gemini_content.Part] = response.candidates[0].content.parts
        return "".join(part.text for part in parts if not part.thought)


def _image_error(code: int, message: str) -> AnalyzerFailure:
    """A per-image error in Vision's response; permanent unless its code says otherwise."""
    name = code_pb2.Code.Name(code) if code in code_pb2.Code.values() else str(code)
    text = f"vision could not annotate the image: {message} ({name})"
    if code == code_pb2.RESOURCE_EXHAUSTED:
        return QuotaExceeded(text, api=VISION)
    if code in _TRANSIENT_CODES:
        return TransientAnalyzerError(text)
    return PermanentAnalyzerError(text)


def _unit_vector(values: object, dimensions: int) -> npt.NDArray[np.float32]:
    """``values`` as an L2-normalised vector of ``dimensions``. An answer that is no such vector
    comes from a model that is not the multimodal embedding model configured (e.g. a wrong
    ``--embedding-model``, or a dimension it does not produce): a configuration problem that
    every attempt would meet, so permanent."""
    if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
        raise PermanentAnalyzerError(
            "embeddings: the answer has no imageEmbedding", reason=INVALID_UPSTREAM_RESPONSE
        )
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (dimensions,):
        raise PermanentAnalyzerError(
            f"embeddings: {vector.shape[0]} dimensions, expected {dimensions}",
            reason=INVALID_UPSTREAM_RESPONSE,
        )
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise PermanentAnalyzerError(
            "embeddings: a zero or non-finite vector", reason=INVALID_UPSTREAM_RESPONSE
        )
    return (vector / norm).astype(np.float32)
