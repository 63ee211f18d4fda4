"""Local stand-ins for Google's APIs, speaking the real protocol.

``FakeVision`` serves ``google.cloud.vision.v1.ImageAnnotator/BatchAnnotateImages`` and
``FakeVertex`` serves ``google.cloud.aiplatform.v1.PredictionService/Predict`` and
``/GenerateContent``, each a grpc.aio server on a free loopback port whose generic handlers
(de)serialise with the message classes shipped in google-cloud-vision and
google-cloud-aiplatform. The analyser under test talks to them with the real async clients.

They record every request (and the deadline it came with), answer with scripted content, and
fail on demand: with a gRPC status (carrying ``google.rpc.RetryInfo`` when given a retry
delay), or by never answering (``HANG``).

``FakeTokenEndpoint`` stands in for the OAuth 2.0 token endpoint credentials are refreshed at.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.cloud import vision_v1
from google.cloud.aiplatform_v1.types import content as gemini_content
from google.cloud.aiplatform_v1.types import prediction_service
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from google.type import color_pb2
from grpc_status import rpc_status

VISION_SERVICE = "google.cloud.vision.v1.ImageAnnotator"
PREDICTION_SERVICE = "google.cloud.aiplatform.v1.PredictionService"
ANNOTATE = "BatchAnnotateImages"
PREDICT = "Predict"
GENERATE = "GenerateContent"


@dataclass(frozen=True)
class Fault:
    """Answer a call with this gRPC status (and RetryInfo when ``retry_delay`` is set)."""

    code: grpc.StatusCode
    message: str
    retry_delay: float | None = None


class _Hang:
    """Never answer (until the caller gives up)."""


HANG = _Hang()


@dataclass
class Received:
    """One call as the fake saw it."""

    request: Any
    at: float
    # Seconds left until the caller's deadline when the call arrived; None without one.
    time_remaining: float | None


@dataclass
class _FakeServer:
    """A grpc.aio server on 127.0.0.1 with per-method scripted faults and recorded calls."""

    received: dict[str, list[Received]] = field(default_factory=dict)
    # Faults for the next calls of a method, in order; then ``always`` (if set), then success.
    next_faults: dict[str, list[Fault | _Hang]] = field(default_factory=dict)
    always: dict[str, Fault | _Hang] = field(default_factory=dict)
    # The port to listen on; 0: a free one, chosen at start.
    port: int = 0
    _server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fail_next(self, method: str, *faults: Fault | _Hang) -> None:
        self.next_faults.setdefault(method, []).extend(faults)

    def calls(self, method: str) -> list[Received]:
        return self.received.get(method, [])

    def _handlers(self) -> Sequence[grpc.GenericRpcHandler]:
        raise NotImplementedError

    async def start(self) -> None:
        self._server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._server.add_generic_rpc_handlers(self._handlers())
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def _arrive(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Record the call, then fail it if the script says so."""
        self.received.setdefault(method, []).append(
            Received(request, time.monotonic(), context.time_remaining())
        )
        pending = self.next_faults.get(method)
        fault = pending.pop(0) if pending else self.always.get(method)
        if isinstance(fault, _Hang):
            # Ended by the caller's deadline (the call is cancelled) or the server's stop.
            await asyncio.Event().wait()
        if isinstance(fault, Fault):
            details = []
            if fault.retry_delay is not None:
                info = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(
                        seconds=int(fault.retry_delay),
                        nanos=int(fault.retry_delay % 1 * 1e9),
                    )
                )
                packed = any_pb2.Any()
                packed.Pack(info)
                details.append(packed)
            status = rpc_status.to_status(
                status_pb2.Status(code=fault.code.value[0], message=fault.message, details=details)
            )
            await context.abort(status.code, status.details, status.trailing_metadata)


def _unary(
    behaviour: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any],
    request_type: Any,
    response_type: Any,
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=request_type.deserialize,
        response_serializer=response_type.serialize,
    )


@dataclass
class FakeVision(_FakeServer):
    """Cloud Vision: the same labels, objects, colours and safe search for every image.

    ``image_error`` (code, message) answers each image with a per-image error instead.
    """

    labels: list[tuple[str, float]] = field(default_factory=list)
    objects: list[tuple[str, float]] = field(default_factory=list)
    # (red, green, blue, pixel_fraction)
    colours: list[tuple[float, float, float, float]] = field(default_factory=list)
    # Category -> vision_v1.Likelihood value.
    safe_search: dict[str, int] = field(default_factory=dict)
    image_error: tuple[int, str] | None = None

    def _handlers(self) -> Sequence[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(
                VISION_SERVICE,
                {
                    ANNOTATE: _unary(
                        self._annotate,
                        vision_v1.BatchAnnotateImagesRequest,
                        vision_v1.BatchAnnotateImagesResponse,
                    )
                },
            )
        ]

    def requests(self) -> list[vision_v1.BatchAnnotateImagesRequest]:
        return [call.request for call in self.calls(ANNOTATE)]

    async def _annotate(
        self,
        request: vision_v1.BatchAnnotateImagesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> vision_v1.BatchAnnotateImagesResponse:
        await self._arrive(ANNOTATE, request, context)
        return vision_v1.BatchAnnotateImagesResponse(
            responses=[self._one() for _ in request.requests]
        )

    def _one(self) -> vision_v1.AnnotateImageResponse:
        if self.image_error is not None:
            code, message = self.image_error
            return vision_v1.AnnotateImageResponse(
                error=status_pb2.Status(code=code, message=message)
            )
        return vision_v1.AnnotateImageResponse(
            label_annotations=[
                vision_v1.EntityAnnotation(description=name, score=score, topicality=score)
                for name, score in self.labels
            ],
            localized_object_annotations=[
                vision_v1.LocalizedObjectAnnotation(name=name, score=score)
                for name, score in self.objects
            ],
            image_properties_annotation=vision_v1.ImageProperties(
                dominant_colors=vision_v1.DominantColorsAnnotation(
                    colors=[
                        vision_v1.ColorInfo(
                            color=color_pb2.Color(red=r, green=g, blue=b),
                            score=share,
                            pixel_fraction=share,
                        )
                        for r, g, b, share in self.colours
                    ]
                )
            ),
            safe_search_annotation=vision_v1.SafeSearchAnnotation(**self.safe_search),
        )


@dataclass
class FakeVertex(_FakeServer):
    """Vertex AI: ``vector`` as every image's embedding, ``answers`` as Gemini's texts in turn
    (the last one repeats)."""

    vector: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=lambda: ['{"tags": []}'])

    def _handlers(self) -> Sequence[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(
                PREDICTION_SERVICE,
                {
                    PREDICT: _unary(
                        self._predict,
                        prediction_service.PredictRequest,
                        prediction_service.PredictResponse,
                    ),
                    GENERATE: _unary(
                        self._generate,
                        prediction_service.GenerateContentRequest,
                        prediction_service.GenerateContentResponse,
                    ),
                },
            )
        ]

    def predict_requests(self) -> list[prediction_service.PredictRequest]:
        return [call.request for call in self.calls(PREDICT)]

    def generate_requests(self) -> list[prediction_service.GenerateContentRequest]:
        return [call.request for call in self.calls(GENERATE)]

    async def _predict(
        self,
        request: prediction_service.PredictRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> prediction_service.PredictResponse:
        await self._arrive(PREDICT, request, context)
        predictions = []
        for _ in request.instances:
            prediction = struct_pb2.Value()
            prediction.struct_value.update({"imageEmbedding": self.vector})
            predictions.append(prediction)
        response: prediction_service.PredictResponse = prediction_service.PredictResponse.wrap(
            prediction_service.PredictResponse.pb()(predictions=predictions)
        )
        return response

    async def _generate(
        self,
        request: prediction_service.GenerateContentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> prediction_service.GenerateContentResponse:
        await self._arrive(GENERATE, request, context)
        answer = self.answers[min(len(self.calls(GENERATE)), len(self.answers)) - 1]
        return prediction_service.GenerateContentResponse(
            candidates=[
                gemini_content.Candidate(
                    content=gemini_content.Content(
                        role="model", parts=[gemini_content.Part(text=answer)]
                    ),
                    finish_reason=gemini_content.Candidate.FinishReason.STOP,
                )
            ]
        )


def quota(message: str = "Quota exceeded", retry_delay: float | None = None) -> Fault:
    return Fault(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_delay)


def unavailable(message: str = "The service is currently unavailable.") -> Fault:
    return Fault(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str = "Internal error encountered.") -> Fault:
    return Fault(grpc.StatusCode.INTERNAL, message)


def invalid_argument(message: str) -> Fault:
    return Fault(grpc.StatusCode.INVALID_ARGUMENT, message)


BAD_IMAGE_DATA = (code_pb2.INVALID_ARGUMENT, "Bad image data.")


class FakeTokenEndpoint:
    """Google's OAuth 2.0 token endpoint, answering every grant with ``status`` and ``body``
    (by default refusing it as for a revoked or deleted key), on a free loopback port.

    Plain HTTP in a thread of its own, as google-auth refreshes credentials synchronously.
    """

    def __init__(
        self,
        status: int = 400,
        body: dict[str, str] | None = None,
    ) -> None:
        answer = json.dumps(
            body or {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        ).encode()
        self.grants: list[float] = []
        grants = self.grants

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                grants.append(time.monotonic())
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def service_account_key(token_uri: str) -> dict[str, str]:
    """A service account key file's content, with a new RSA key, refreshed at ``token_uri``."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "test-key",
        "private_key": pem.decode("ascii"),
        "client_email": "mediatag@test-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
