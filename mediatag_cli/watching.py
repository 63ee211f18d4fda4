"""A WatchStatus stream that outlives restarts of the analysis service.

On ``UNAVAILABLE`` (the service restarted or drained) or ``RESOURCE_EXHAUSTED`` (this
watcher fell behind, or the watcher cap is reached) it reconnects after a jittered,
exponentially growing delay and resumes after the last revision it saw, so no event is
missed. When that revision cannot be resumed (``OUT_OF_RANGE``: ``REVISION_COMPACTED`` out of
the event log, or ``REVISION_AHEAD`` of a replaced one) it starts over with the current state
of every watched item.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

import grpc
from mediatag.analysis.v1 import analysis_pb2

from mediatag_common.backoff import Backoff
from mediatag_common.errors import RESYNC_REASONS, error_info

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub

_RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class ResumableWatch:
    """Every response of ``WatchStatus(request)``, across reconnects, in revision order.

    ``resume`` builds the request for a reconnect from the last revision seen; by default it
    is ``request`` resuming after that revision (or ``request`` again while its initial state
    has not been received in full). ``notice`` is told about each reconnect in words.
    ``timeout`` bounds the unary call that anchors a "from now" watch to a revision.
    """

    def __init__(
        self,
        stub: AnalysisServiceAsyncStub,
        request: analysis_pb2.WatchStatusRequest,
        *,
        address: str,
        timeout: float,
        notice: Callable[[str], None],
        resume: Callable[[int], analysis_pb2.WatchStatusRequest] | None = None,
    ) -> None:
        self._stub = stub
        self._address = address
        self._timeout = timeout
        self._request = request
        self._notice = notice
        self._resume = resume or self._resume_after
        self._backoff = Backoff(initial=0.5, maximum=30.0)
        self.last_revision = 0
        self._initial_state_pending = request.send_initial_state

    async def responses(self) -> AsyncGenerator[analysis_pb2.WatchStatusResponse, None]:
        """Yield responses until the service ends the stream with OK.

        Other errors are raised. Close it with ``contextlib.aclosing``.
        """
        request = self._request
        while True:
            try:
                if request.start_revision == 0 and not request.send_initial_state:
                    request = await self._anchor(request)
                call = self._stub.WatchStatus(request)
                try:
                    async for response in call:
                        self._backoff.reset()
                        self._observe(response)
                        yield response
                    return
                finally:
                    call.cancel()
            except grpc.aio.AioRpcError as error:
                request = await self._recover(error)

    async def _anchor(
        self, request: analysis_pb2.WatchStatusRequest
    ) -> analysis_pb2.WatchStatusRequest:
        """``request`` from the current revision instead of "from now".

        A stream that is cut before it delivers anything can then still resume without a gap.
        """
        status = await self._stub.GetQueueStatus(
            analysis_pb2.GetQueueStatusRequest(), timeout=self._timeout
        )
        anchored = analysis_pb2.WatchStatusRequest()
        anchored.CopyFrom(request)
        anchored.start_revision = status.current_revision
        self.last_revision = status.current_revision
        self._request = anchored
        return anchored

    def _observe(self, response: analysis_pb2.WatchStatusResponse) -> None:
        if response.revision > 0:
            self.last_revision = response.revision
        if response.HasField("bookmark") and response.bookmark.initial_state_end:
            self._initial_state_pending = False

    async def _recover(self, error: grpc.aio.AioRpcError) -> analysis_pb2.WatchStatusRequest:
        """Wait as long as ``error`` calls for and return the request to retry with."""
        info = error_info(error)
        if error.code() == grpc.StatusCode.OUT_OF_RANGE and info and info.reason in RESYNC_REASONS:
            self._notice(
                f"revision {self.last_revision} cannot be resumed ({info.reason}); "
                "starting over from the current state"
            )
            self.last_revision = 0
            self._initial_state_pending = True
            restart = analysis_pb2.WatchStatusRequest()
            restart.CopyFrom(self._request)
            restart.start_revision = 0
            restart.send_initial_state = True
            # Later reconnects build on this request, not on the compacted one.
            self._request = restart
            return restart
        if error.code() not in _RECONNECT_CODES:
            raise error
        delay = self._backoff.next_delay()
        reason = f" {info.reason}" if info and info.reason else ""
        self._notice(
            f"analysis service at {self._address}: {error.code().name}{reason}: "
            f"{error.details()}; reconnecting in {delay:.1f} s"
        )
        await asyncio.sleep(delay)
        return self._resume(self.last_revision)

    def _resume_after(self, revision: int) -> analysis_pb2.WatchStatusRequest:
        if self._initial_state_pending or revision == 0:
            return self._request
        resumed = analysis_pb2.WatchStatusRequest()
        resumed.CopyFrom(self._request)
        resumed.start_revision = revision
        resumed.send_initial_state = False
        return resumed
