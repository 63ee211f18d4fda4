"""An owner-restricted token probing another owner's ids: a real id and an unknown one take the
same work and end in the same refusal (issue 12, item 10). The work is counted at the storage
interface, as the statements each call sends to the database; how long it takes is measured by
``python -m bench timing-oracle``, not here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb
from sqlalchemy import event
from sqlalchemy.engine import Engine

from mediatag_common.errors import error_info, field_violations
from tests.conftest import Cluster
from tests.test_auth import Clients, completed, image_upload
from tests.test_auth import secured as secured  # the fixture: both services with tokens


@contextmanager
def statements_naming(media_id: str) -> Iterator[list[str]]:
    """The SQL statements, of any engine of this process, sent with ``media_id`` as a
    parameter while the block runs (the services' background work names other ids)."""
    seen: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        values = parameters.values() if isinstance(parameters, dict) else parameters
        if media_id in (values or ()):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    """The refusal of a unary call (awaited) or a streaming one (read to its end)."""
    try:
        if isinstance(call, AsyncIterable):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the probe was answered")


async def test_another_owners_id_and_an_unknown_id_take_the_same_work(
    secured: tuple[Cluster, Clients],
) -> None:
    _, clients = secured
    theirs = (await clients.ingest("admin").UploadMedia(image_upload("listing-8", 96))).media[0]
    await completed(clients, [theirs.id])
    unknown = str(uuid.uuid4())
    uploader, viewer = clients.ingest("uploader7"), clients.analysis("viewer7")
    probes: dict[str, Callable[[str], Any]] = {
        "GetJob": lambda media_id: viewer.GetJob(apb.GetJobRequest(media_id=media_id)),
        "GetMedia": lambda media_id: uploader.GetMedia(ipb.GetMediaRequest(media_id=media_id)),
        "ReadMediaContent": lambda media_id: uploader.ReadMediaContent(
            ipb.ReadMediaContentRequest(media_id=media_id)
        ),
    }
    for name, probe in probes.items():
        outcomes = []
        for media_id in (theirs.id, unknown):
            with statements_naming(media_id) as statements:
                error = await _refusal(probe(media_id))
            info = error_info(error)
            assert info is not None
            outcomes.append(
                (
                    statements,
                    error.code(),
                    info.reason,
                    field_violations(error),
                    (error.details() or "").replace(media_id, "<id>"),
                )
            )
        (real, made_up) = outcomes
        assert real == made_up, name
        assert len(real[0]) == 1, name  # one lookup: the owner of the id
        assert real[1:3] == (grpc.StatusCode.PERMISSION_DENIED, "OWNER_NOT_ALLOWED"), name
