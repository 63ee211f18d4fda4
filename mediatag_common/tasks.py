"""Stopping background tasks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended.

    The task's own CancelledError is absorbed; a cancellation of the caller is not. A task
    that had already failed is logged, so that stopping the rest goes on.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        logger.exception("background task %s had failed", task.get_name())
