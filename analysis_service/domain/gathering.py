"""Requests gathered into calls: one round trip for what several workers ask at once.

A request made while fewer than ``max_calls`` calls are under way goes once the event loop
has run what is ready (the other workers' requests of that moment go with it); a request
made while ``max_calls`` are under way waits for the next call, sent as soon as one of them
ends with every request then waiting (up to ``max_batch``). Under load the calls carry as
many requests as arrive during a round trip; alone, a request costs what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


class Gathering(Generic[Request, Answer]):
    """``await gathering.ask(request)``: its answer from ``call``, which answers a sequence of
    requests in order (an exception it raises is every request's of that call).

    At most ``max_calls`` calls are under way. A request cancelled before its call is sent
    is not asked; one cancelled after is asked all the same (the others of its call need the
    call) and its answer dropped.
    """

    def __init__(
        self,
        call: Callable[[Sequence[Request]], Awaitable[Sequence[Answer]]],
        *,
        max_batch: int,
        max_calls: int = 1,
    ) -> None:
        if max_batch < 1 or max_calls < 1:
            raise ValueError("a gathered call carries at least one request; one call may go")
        self._call = call
        self._max_batch = max_batch
        self._max_calls = max_calls
        self._waiting: list[tuple[Request, asyncio.Future[Answer]]] = []
        self._under_way: set[asyncio.Task[None]] = set()
        self._send_soon: asyncio.Handle | None = None

    async def ask(self, request: Request) -> Answer:
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, answer))
        if len(self._under_way) < self._max_calls and self._send_soon is None:
            self._send_soon = asyncio.get_running_loop().call_soon(self._send)
        try:
            return await answer
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._waiting.remove((request, answer))
            raise

    def _send(self) -> None:
        self._send_soon = None
        batch, self._waiting = (
            self._waiting[: self._max_batch],
            self._waiting[self._max_batch :],
        )
        if not batch:
            return
        call = asyncio.create_task(self._answer(batch), name="gathered-call")
        self._under_way.add(call)
        call.add_done_callback(self._ended)

    def _ended(self, call: asyncio.Task[None]) -> None:
        self._under_way.discard(call)
        if not call.cancelled():
            call.exception()  # _answer settles every request; nothing else is left to report
        if self._waiting and self._send_soon is None:
            self._send()

    async def _answer(self, batch: list[tuple[Request, asyncio.Future[Answer]]]) -> None:
        try:
            answers = _checked(await self._call([request for request, _ in batch]), len(batch))
        except BaseException as error:
            for _, answer in batch:
                if answer.done():
                    continue
                if isinstance(error, Exception):
                    answer.set_exception(error)
                else:
                    answer.cancel()
            if not isinstance(error, Exception):
                raise
            return
        for (_, answer), value in zip(batch, answers, strict=True):
            if not answer.done():
                answer.set_result(value)

    async def close(self) -> None:
        """Cancel the call under way (its requests raise CancelledError) and those waiting."""
        if self._send_soon is not None:
            self._send_soon.cancel()
            self._send_soon = None
        waiting, self._waiting = self._waiting, []
        for _, answer in waiting:
            answer.cancel()
        under_way = list(self._under_way)
        for call in under_way:
            call.cancel()
        for call in under_way:
            with contextlib.suppress(asyncio.CancelledError):
                await call


def _checked(answers: Sequence[Answer], asked: int) -> Sequence[Answer]:
    if len(answers) != asked:
        raise RuntimeError(f"{len(answers)} answers to {asked} requests")
    return answers
