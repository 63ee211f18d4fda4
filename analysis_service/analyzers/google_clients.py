"""The wire side of the ``google`` analyser: Cloud Vision and Vertex AI through Google's clients.

Each call passes our own ``timeout`` and ``retry=None``: the libraries' default retry can hold
a call for minutes, and our queue's retry policy decides instead. Errors are classified here,
in one place:

- ``ResourceExhausted`` (quota, 429) -> :class:`QuotaExceeded` for that API, with the delay of
  the ``google.rpc.RetryInfo`` it carries, if any: the API's limiter pauses, the attempt does
  not count;
- ``ServiceUnavailable``, ``DeadlineExceeded`` (our timeout), ``InternalServerError`` and other
  server-side failures -> :class:`TransientAnalyzerError` (retried with backoff);
- ``InvalidArgument`` and other refusals of the request itself, and a per-image error inside
  Vision's response -> :class:`PermanentAnalyzerError` (fails at once, with the reason).

Clients are made on first use, on the running event loop. With ``insecure`` they talk plaintext
to an emulator with no credentials; otherwise they use Application Default Credentials.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import google.auth
import grpc
import numpy as np
import numpy.typing as npt
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import Credentials
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
# A 20 MB image is ~27 MB in base64 inside the embeddings request: no gRPC size limit here.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
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
# Per-image error codes inside Vision's response that say the same as these exceptions.
_TRANSIENT_CODES = frozenset(
    {code_pb2.UNAVAILABLE, code_pb2.INTERNAL, code_pb2.DEADLINE_EXCEEDED, code_pb2.ABORTED}
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


def classify(api: str, exc: Exception, timeout: float) -> AnalyzerFailure:
    """The analyser error for a failed call to ``api``."""
    message = getattr(exc, "message", None) or str(exc)
    text = f"{api}: {type(exc).__name__}: {message}"
    if isinstance(exc, api_exceptions.ResourceExhausted):
        return QuotaExceeded(
            f"{api}: quota exceeded: {message}", api=api, retry_after=retry_delay(exc)
        )
    if isinstance(exc, api_exceptions.DeadlineExceeded):
        return TransientAnalyzerError(
            f"{api}: no answer within {timeout:g} s", reason="ANALYZER_TIMEOUT"
        )
    if isinstance(exc, _PERMANENT):
        return PermanentAnalyzerError(text)
    if isinstance(exc, auth_exceptions.GoogleAuthError) and not (
        isinstance(exc, auth_exceptions.TransportError) or getattr(exc, "retryable", False)
    ):
        # Credentials that cannot be refreshed (revoked, wrong key) stay that way.
        return PermanentAnalyzerError(text)
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
        self._vision: ImageAnnotatorAsyncClient | None = None
        self._prediction: PredictionServiceAsyncClient | None = None
        location = f"projects/{config.project}/locations/{config.location}"
        self.embedding_model_path = f"{location}/publishers/google/models/{config.embedding_model}"
        self.gemini_model_path = f"{location}/publishers/google/models/{config.gemini_model}"

    def _vision_client(self) -> ImageAnnotatorAsyncClient:
        if self._vision is None:
            endpoint = self._config.vision_endpoint
            if self._config.insecure:
                channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
                self._vision = ImageAnnotatorAsyncClient(
                    transport=ImageAnnotatorGrpcAsyncIOTransport(host=endpoint, channel=channel)
                )
            else:
                self._vision = ImageAnnotatorAsyncClient(
                    credentials=self._credentials,
                    client_options=ClientOptions(api_endpoint=endpoint),
                )
        return self._vision

    def _prediction_client(self) -> PredictionServiceAsyncClient:
        if self._prediction is None:
            endpoint = self._config.resolved_vertex_endpoint
            if self._config.insecure:
                channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
                self._prediction = PredictionServiceAsyncClient(
                    transport=PredictionServiceGrpcAsyncIOTransport(host=endpoint, channel=channel)
                )
            else:
                self._prediction = PredictionServiceAsyncClient(
                    credentials=self._credentials,
                    client_options=ClientOptions(api_endpoint=endpoint),
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

    async def _call(self, api: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (api_exceptions.GoogleAPICallError, auth_exceptions.GoogleAuthError) as exc:
            raise classify(api, exc, self._config.request_timeout) from exc

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
            self._vision_client().batch_annotate_images(
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
            raise _image_error(found.error.code, found.error.message, self._config.request_timeout)
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
            self._prediction_client().predict(
                request=self.embedding_request(image),
                timeout=self._config.request_timeout,
                retry=None,
            ),
        )
        predictions = prediction_service.PredictResponse.pb(response).predictions
        answer = json_format.MessageToDict(predictions[0]) if predictions else {}
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
        """Gemini's answer text, or None when it gave no candidate (e.g. blocked)."""
        response = await self._call(
            GEMINI,
            self._prediction_client().generate_content(
                request=self.refine_request(image, prompt),
                timeout=self._config.request_timeout,
                retry=None,
            ),
        )
        if not response.candidates:
            logger.warning(
                "Gemini gave no answer (%s); keeping Vision's tags",
                response.prompt_feedback.block_reason_message or "no candidates",
            )
            return None
        parts: Sequence[gemini_content.Part] = response.candidates[0].content.parts
        return "".join(part.text for part in parts if not part.thought)


def _image_error(code: int, message: str, timeout: float) -> AnalyzerFailure:
    """A per-image error in Vision's response; permanent unless its code says otherwise."""
    name = code_pb2.Code.Name(code) if code in code_pb2.Code.values() else str(code)
    text = f"vision could not annotate the image: {message} ({name})"
    if code == code_pb2.RESOURCE_EXHAUSTED:
        return QuotaExceeded(text, api=VISION)
    if code in _TRANSIENT_CODES:
        return TransientAnalyzerError(text)
    return PermanentAnalyzerError(text)


def _unit_vector(values: object, dimensions: int) -> npt.NDArray[np.float32]:
    if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
        raise PermanentAnalyzerError(
            "embeddings: the answer has no imageEmbedding", reason="INVALID_UPSTREAM_RESPONSE"
        )
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (dimensions,):
        raise PermanentAnalyzerError(
            f"embeddings: {vector.shape[0]} dimensions, expected {dimensions}",
            reason="INVALID_UPSTREAM_RESPONSE",
        )
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise PermanentAnalyzerError(
            "embeddings: a zero or non-finite vector", reason="INVALID_UPSTREAM_RESPONSE"
        )
    return (vector / norm).astype(np.float32)
