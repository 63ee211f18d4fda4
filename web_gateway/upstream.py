"""The gateway as a gRPC client of both services.

Unary calls carry the caller's own token (the services check its roles and owners, as for
any client); the ``WatchStatus`` streams shared among clients carry the gateway's service
token, and the gateway applies each client's owners itself (``domain.watches``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2_grpc

from mediatag_common.auth.interceptor import AUTHORIZATION
from mediatag_common.grpc_server import channel_options, open_channel
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

Metadata = tuple[tuple[str, str], ...]


def credentials(token: str | None) -> Metadata:
    """Call metadata that authenticates as ``token`` (none without one)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    """A failed call's ``google.rpc.Status``, with the details the service sent."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    if status is None:
        # gRPC's own errors (unreachable, message too large) carry no details.
        status = status_pb2.Status(code=error.code().value[0], message=error.details() or "")
    return Refusal(status)


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
        self._ingest_channel = open_channel(
            config.ingest_address, options=channel_options(), tls=config.peer_tls
        )
        self._analysis_channel = open_channel(
            config.analysis_address, options=channel_options(), tls=config.peer_tls
        )
        self.ingest: IngestServiceAsyncStub = ingest_pb2_grpc.IngestServiceStub(
            self._ingest_channel
        )
        self.analysis: AnalysisServiceAsyncStub = analysis_pb2_grpc.AnalysisServiceStub(
            self._analysis_channel
        )

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
            raise refusal_of(error) from None
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
            raise refusal_of(error) from None
        finally:
            call.cancel()
        raise unavailable("ANALYSIS_UNAVAILABLE", "the analysis service ended the watch")
