"""The client side: a channel's calls carry ``authorization: Bearer <token>``."""

from __future__ import annotations

from typing import Any

import grpc

from mediatag_common.auth.interceptor import AUTHORIZATION


def _with_token(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenInterceptor:
    """Adds ``authorization: Bearer <token>`` to every call of a channel.

    Metadata rather than call credentials, which gRPC sends only over TLS: the services may
    call each other in plaintext on loopback.
    """

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<token hidden>)"


class _UnaryUnaryToken(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _UnaryStreamToken(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _StreamUnaryToken(_TokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._header), requests)


class _StreamStreamToken(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._header), requests)


def token_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """The client interceptors that send ``token`` with every call (none for no token).

    One per kind of call: grpc.aio files an interceptor under the first kind it implements.
    """
    if not token:
        return []
    return [
        _UnaryUnaryToken(token),
        _UnaryStreamToken(token),
        _StreamUnaryToken(token),
        _StreamStreamToken(token),
    ]
