"""The gateway as a gRPC client of both services.

Unary calls carry the caller's own token (the services check its roles and owners, as for
any client); the ``WatchStatus`` streams shared among clients carry the gateway's service
token, and the gateway applies each client's owners itself (``domain.watches``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.rpc import code_pb2
from grpc_status import rpc_status
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2_grpc

from mediatag_common.auth.interceptor import AUTHORIZATION
from mediatag_common.grpc_server import channel_options, open_channel
from mediatag_common.log_limits import RateLimitedLog
from mediatag_common.service_config import MIB
from web_gateway.config import WebConfig
from web_gateway.domain.events import Change, Position, WatchFilter
from web_gateway.errors import Refusal, unavailable
from web_gateway.protojson import to_json

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub
    from mediatag.ingest.v1.ingest_pb2_grpc import IngestServiceAsyncStub

# A media id no item has (uuid4 never makes the nil UUID): a watch of it sends its empty
# initial state and then the bookmark that tells the current revision.
_NO_ITEM = "00000000-0000-0000-0000-000000000000"
_STATUS_PREFIX = "PROCESSING_STATUS_"
# The ingest service's own cap on one message (IngestConfig.max_message_bytes): an upload
# batch the gateway holds (up to max_batch_upload_bytes, 128 MiB) goes as one UploadMedia.
_INGEST_MESSAGE_BYTES = 128 * MIB
INGEST = "ingest"
ANALYSIS = "analysis"

logger = logging.getLogger(__name__)
# A service that cannot be reached fails every call of every client: the log has one line
# per service and code every this many seconds.
_FAILURE_LOG_INTERVAL = 10.0
_failure_log = RateLimitedLog(logger, _FAILURE_LOG_INTERVAL)

Metadata = tuple[tuple[str, str], ...]


def credentials(token: str | None) -> Metadata:
    """Call metadata that authenticates as ``token`` (none without one)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def timed_out(service: str) -> Refusal:
    """``service`` did not answer, or take or send the next message of a stream, in time."""
    return Refusal.of(
        code_pb2.DEADLINE_EXCEEDED,
        f"{service.upper()}_TIMEOUT",
        f"the {service} service did not answer in time",
    )


def refusal_of(
    error: grpc.aio.AioRpcError,
    service: str | None = None,
    log: RateLimitedLog = _failure_log,
) -> Refusal:
    """A failed call's ``google.rpc.Status``, with the details the service sent; a failure
    of gRPC's own as a fixed refusal naming ``service``, its cause logged to ``log``."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    if status is not None:
        return Refusal(status)
    # gRPC's own errors (unreachable, deadline, message too large) carry no details, and their
    # text names internal addresses: the client reads what failed, the log why.
    name = service or "upstream"
    code = error.code()
    log.warning(
        f"{name} {code.name}",
        "a call to the %s service failed: %s %s",
        name,
        code.name,
        error.details(),
    )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return timed_out(name)
    return unavailable(
        f"{name.upper()}_UNAVAILABLE", f"the {name} service is unavailable; try again shortly"
    )


class _UnaryCalls:
    """A unary method whose failures are refusals naming its service."""

    def __init__(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        service: str,
        log: RateLimitedLog,
    ) -> None:
        self._method = method
        self._service = service
        self._log = log

    async def __call__(self, request: Any, **options: Any) -> Any:
        try:
            return await self._method(request, **options)
        except grpc.aio.AioRpcError as error:
            raise refusal_of(error, self._service, self._log) from None


class _ServiceChannel:
    """A channel whose unary methods fail as refusals naming ``service``: the handlers' one
    helper for unary calls (``api.context.call``) cannot tell which service it called. The
    streaming methods are the channel's own; their callers name the service themselves."""

    def __init__(self, channel: grpc.aio.Channel, service: str, log: RateLimitedLog) -> None:
        self._channel = channel
        self._service = service
        self._log = log

    def unary_unary(self, *args: Any, **kwargs: Any) -> _UnaryCalls:
        return _UnaryCalls(self._channel.unary_unary(*args, **kwargs), self._service, self._log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def _change(response: apb.WatchStatusResponse) -> Change:
    change = response.change
    return Change(
        revision=response.revision,
        owner_id=change.owner_id,
        media_id=change.media_id,
        status=apb.ProcessingStatus.Name(change.status).removeprefix(_STATUS_PREFIX),
        event_time=change.event_time.ToNanoseconds() / 1e9,
        data=to_json(response),
    )


class Upstream:
    """Channels to the ingest and analysis services, and their stubs."""

    def __init__(self, config: WebConfig) -> None:
        self.timeout = config.call_timeout
        self._service_credentials = credentials(config.service_token)
        self._failure_log = RateLimitedLog(logger, _FAILURE_LOG_INTERVAL)
        # A batch of uploads is one message of up to max_batch_upload_bytes (its fields
        # counted): above the channels' usual cap (64 MiB), within ingest's.
        ingest_cap = max(_INGEST_MESSAGE_BYTES, config.max_batch_upload_bytes)
        self._ingest_channel = open_channel(
            config.ingest_address, options=channel_options(ingest_cap), tls=config.peer_tls
        )
        self._analysis_channel = open_channel(
            config.analysis_address, options=channel_options(), tls=config.peer_tls
        )
        self.ingest: IngestServiceAsyncStub = ingest_pb2_grpc.IngestServiceStub(
            cast(grpc.aio.Channel, _ServiceChannel(self._ingest_channel, INGEST, self._failure_log))
        )
        self.analysis: AnalysisServiceAsyncStub = analysis_pb2_grpc.AnalysisServiceStub(
            cast(
                grpc.aio.Channel,
                _ServiceChannel(self._analysis_channel, ANALYSIS, self._failure_log),
            )
        )

    def refusal(self, error: grpc.aio.AioRpcError, service: str) -> Refusal:
        """``error`` of a call to ``service`` as :func:`refusal_of` has it."""
        return refusal_of(error, service, self._failure_log)

    async def close(self) -> None:
        await self._ingest_channel.close()
        await self._analysis_channel.close()

    # ---- the WatchSource of the shared watches ----

    async def open(self, watch_filter: WatchFilter, after: int) -> AsyncIterator[Change | Position]:
        request = apb.WatchStatusRequest(
            owner_id=watch_filter.owner_id,
            media_ids=sorted(watch_filter.media_ids),
            start_revision=after,
        )
        call = self.analysis.WatchStatus(request, metadata=self._service_credentials)
        try:
            async for response in call:
                if response.HasField("change"):
                    yield _change(response)
                else:
                    yield Position(response.revision)
        except grpc.aio.AioRpcError as error:
            raise self.refusal(error, ANALYSIS) from None
        finally:
            call.cancel()

    async def current_revision(self) -> int:
        request = apb.WatchStatusRequest(media_ids=[_NO_ITEM], send_initial_state=True)
        call = self.analysis.WatchStatus(
            request, metadata=self._service_credentials, timeout=self.timeout
        )
        try:
            async for response in call:
                if response.HasField("bookmark") and response.bookmark.initial_state_end:
                    return response.revision
        except grpc.aio.AioRpcError as error:
            raise self.refusal(error, ANALYSIS) from None
        finally:
            call.cancel()
        raise unavailable("ANALYSIS_UNAVAILABLE", "the analysis service ended the watch")
