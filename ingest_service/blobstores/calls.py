"""Calls to a blob store, off the event loop: timed, reported, their errors the service's."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from ingest_service.domain.observer import BlobStoreObserver
from ingest_service.errors import IngestError, StorageUnavailable, blob_store_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A backend's own errors as the service's (None: not the store's failure, a bug).
Classify = Callable[[Exception], StorageUnavailable | None]


class StoreCalls:
    """Runs one store's blocking calls in ``executor`` (None: asyncio's default)."""

    def __init__(
        self, observer: BlobStoreObserver, classify: Classify, executor: Executor | None = None
    ) -> None:
        self._observer = observer
        self._classify = classify
        self._executor = executor

    async def run(self, operation: str, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a thread; a failure of the store is StorageUnavailable.

        A caller cancelled meanwhile waits for the thread before the cancellation goes on
        (the call's own timeout bounds that), so whatever follows, such as removing a
        partial upload, never runs beside it.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        failure: str | None = None
        future = loop.run_in_executor(self._executor, functools.partial(function, *args))
        try:
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                await asyncio.wait([future])
                if not future.cancelled():
                    future.exception()  # retrieved: nobody else will
                raise
        except IngestError as exc:
            # The store's own answer, already the service's (a blob it does not hold).
            failure = exc.reason
            raise
        except Exception as exc:
            error = self._classify(exc)
            if error is None and isinstance(exc, OSError):
                error = blob_store_error(exc)
            if error is None:
                raise
            failure = error.reason
            # The cause (which may name the bucket or path) goes to the log, not to clients.
            logger.warning("blob store %s failed (%s): %s", operation, failure, exc)
            raise error from exc
        finally:
            self._observer.blob_store_call(operation, time.perf_counter() - started, failure)


def no_backend_errors(exc: Exception) -> StorageUnavailable | None:
    """For a store whose only failures are OSErrors (a local directory)."""
    return None
