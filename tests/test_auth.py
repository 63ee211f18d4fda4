"""Bearer tokens, roles and owners (SPEC §8), against both real services."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from analysis_service.server import create_server as create_analysis
from ingest_service import api as ingest_api
from ingest_service.config import IngestConfig
from ingest_service.server import create_server as create_ingest
from mediatag_cli.main import parse, run_client
from mediatag_cli.settings import SettingsError, serve_settings
from mediatag_common.auth import INGEST_METHOD_ROLES, TokensFileError, interceptor, load_tokens
from mediatag_common.grpc_server import health_check_stub, open_channel
from tests import media_samples as samples
from tests.conftest import PATIENCE, Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.test_ingest_service import assert_refused, refusal

PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

TOKENS = {
    "admin": "admin-token-0123456789",
    "service": "service-token-0123456789",
    "viewer": "viewer-token-0123456789",
    "uploader7": "uploader7-token-0123456789",
    "viewer7": "viewer7-token-0123456789",
    "viewer78": "viewer78-token-0123456789",
    "hashed": "hashed-token-0123456789",
}
TOKENS_TOML = f"""
[[tokens]]
name = "ops"
token = "{TOKENS["admin"]}"
roles = ["admin"]

[[tokens]]
name = "ingest-analysis"
token = "{TOKENS["service"]}"
roles = ["service"]

[[tokens]]
name = "dashboard"
token = "{TOKENS["viewer"]}"
roles = ["viewer"]

[[tokens]]
name = "listing-7-app"
token = "{TOKENS["uploader7"]}"
roles = ["uploader"]
owners = ["listing-7"]

[[tokens]]
name = "listing-7-viewer"
token = "{TOKENS["viewer7"]}"
roles = ["viewer"]
owners = ["listing-7"]

[[tokens]]
name = "two-listings"
token = "{TOKENS["viewer78"]}"
roles = ["viewer"]
owners = ["listing-7", "listing-8"]

[[tokens]]
name = "hashed-viewer"
token_sha256 = "{hashlib.sha256(TOKENS["hashed"].encode()).hexdigest()}"
roles = ["viewer"]
"""


def tokens_file(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tokens.toml"
    path.write_text(TOKENS_TOML)
    return path


class Clients:
    """Stubs of both services for each token (None: no token)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._channels: list[grpc.aio.Channel] = []

    def _channel(self, port: int, token: str | None) -> grpc.aio.Channel:
        channel = open_channel(f"127.0.0.1:{port}", token=token)
        self._channels.append(channel)
        return channel

    def ingest(self, who: str | None) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        token = TOKENS[who] if who else None
        return ingest_pb2_grpc.IngestServiceStub(self._channel(self._cluster.ingest_port, token))

    def analysis(self, who: str | None) -> analysis_pb2_grpc.AnalysisServiceAsyncStub:
        token = TOKENS[who] if who else None
        channel = self._channel(self._cluster.analysis_port, token)
        return analysis_pb2_grpc.AnalysisServiceStub(channel)

    def raw(self, port: int) -> grpc.aio.Channel:
        return self._channel(port, None)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@pytest.fixture
async def secured(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> AsyncIterator[tuple[Cluster, Clients]]:
    """Both services with the tokens file, reaching each other with the service token."""
    path = tokens_file(tmp_path / "secrets")
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(
            rate_limits={"local": RateLimitConfig(100, 10)},
            # Idle streams get a bookmark soon: a watch that must stay empty shows it.
            watch=WatchConfig(bookmark_interval=0.3),
            tokens_file=path,
            service_token=TOKENS["service"],
        ),
        ingest_config=IngestConfig(tokens_file=path, service_token=TOKENS["service"]),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    clients = Clients(cluster)
    yield cluster, clients
    await clients.close()


def image_upload(owner: str, seed: int, n: int = 1) -> ipb.UploadMediaRequest:
    return ipb.UploadMediaRequest(
        owner_id=owner,
        files=[
            ipb.MediaFile(filename=f"{i}.jpg", content=samples.jpeg_bytes(seed + i))
            for i in range(n)
        ],
    )


async def completed(clients: Clients, media_ids: list[str]) -> None:
    """Wait until ingest (its status mirror) shows every item completed."""
    admin = clients.ingest("admin")

    async def done() -> bool:
        for media_id in media_ids:
            media = (await admin.GetMedia(ipb.GetMediaRequest(media_id=media_id))).media
            if media.status != ipb.PROCESSING_STATUS_COMPLETED:
                return False
        return True

    await wait_until(done)


# ---- authentication ----


async def test_health_and_reflection_need_no_token(secured: tuple[Cluster, Clients]) -> None:
    cluster, clients = secured
    for port in (cluster.ingest_port, cluster.analysis_port):
        channel = clients.raw(port)
        health = await health_check_stub(channel)(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in call for s in r.list_services_response.service]
        assert any(name.startswith("mediatag.") for name in names)


async def test_every_other_call_needs_a_token(secured: tuple[Cluster, Clients]) -> None:
    _, clients = secured
    ingest, analysis = clients.ingest(None), clients.analysis(None)
    calls: list[Any] = [
        ingest.UploadMedia(image_upload("listing-7", 1)),
        ingest.GetMedia(ipb.GetMediaRequest(media_id="nope")),
        ingest.ListMedia(ipb.ListMediaRequest(owner_id="listing-7")),
        ingest.ReprocessMedia(ipb.ReprocessMediaRequest(media_ids=["nope"])),
        analysis.GetQueueStatus(apb.GetQueueStatusRequest()),
        analysis.GetJob(apb.GetJobRequest(media_id="nope")),
        analysis.SubmitJobs(apb.SubmitJobsRequest()),
        analysis.PauseQueue(apb.PauseQueueRequest()),
    ]
    for call in calls:
        assert_refused(await refusal(call), UNAUTHENTICATED, "TOKEN_MISSING", None)
    streams: list[Any] = [
        ingest.ReadMediaContent(ipb.ReadMediaContentRequest(media_id="nope")),
        analysis.WatchStatus(apb.WatchStatusRequest()),
    ]
    for stream in streams:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        assert_refused(caught.value, UNAUTHENTICATED, "TOKEN_MISSING", None)


async def test_an_unknown_or_malformed_token_is_unauthenticated(
    secured: tuple[Cluster, Clients],
) -> None:
    cluster, clients = secured
    channel = clients.raw(cluster.ingest_port)
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    request = ipb.ListMediaRequest(owner_id="listing-7")
    for header in (
        "Bearer not-a-known-token-at-all",
        f"Basic {TOKENS['admin']}",  # the right secret, the wrong scheme
        f"Bearer {TOKENS['admin']}x",
        "Bearer ",
    ):
        error = await refusal(stub.ListMedia(request, metadata=[("authorization", header)]))
        assert_refused(error, UNAUTHENTICATED, "TOKEN_INVALID", None)
    # The scheme is case-insensitive (RFC 7235); a token given as its SHA-256 works.
    ok = await stub.ListMedia(request, metadata=[("authorization", f"bearer {TOKENS['admin']}")])
    assert list(ok.media) == []
    assert await clients.ingest("hashed").ListMedia(request) is not None


async def test_two_authorization_headers_are_refused(secured: tuple[Cluster, Clients]) -> None:
    cluster, clients = secured
    stub = ingest_pb2_grpc.IngestServiceStub(clients.raw(cluster.ingest_port))
    request = ipb.ListMediaRequest(owner_id="listing-7")
    admin, viewer = f"Bearer {TOKENS['admin']}", f"Bearer {TOKENS['viewer7']}"
    for headers in ([admin, viewer], [viewer, admin], [admin, admin]):
        error = await refusal(
            stub.ListMedia(request, metadata=[("authorization", h) for h in headers])
        )
        assert_refused(error, UNAUTHENTICATED, "TOKEN_INVALID", None)
    assert await stub.ListMedia(request, metadata=[("authorization", admin)]) is not None


async def test_tokens_are_never_logged_the_principal_is(
    secured: tuple[Cluster, Clients], caplog: pytest.LogCaptureFixture
) -> None:
    _, clients = secured
    caplog.set_level(logging.DEBUG)
    wrong = "Bearer wrong-token-that-must-not-appear"
    stub = clients.ingest(None)
    await refusal(
        stub.ListMedia(ipb.ListMediaRequest(owner_id="x"), metadata=[("authorization", wrong)])
    )
    await refusal(clients.ingest("viewer").UploadMedia(image_upload("listing-7", 2)))
    await clients.ingest("uploader7").UploadMedia(image_upload("listing-7", 3))
    text = caplog.text
    assert "dashboard" in text  # the denied principal, by name
    for token in [*TOKENS.values(), "wrong-token-that-must-not-appear"]:
        assert token not in text


@pytest.fixture
def short_refusal_log(monkeypatch: pytest.MonkeyPatch) -> float:
    """Refusal lines of the servers started after it at most once per 2 s (instead of 10)."""
    monkeypatch.setattr(interceptor, "REFUSAL_LOG_INTERVAL", 2.0)
    return 2.0


def refusal_lines(caplog: pytest.LogCaptureFixture, why: str) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == interceptor.__name__]
    return [m for m in messages if m.endswith(f": {why}") or f": {why} (" in m]


def calls_told(lines: list[str]) -> int:
    """The refusals the lines stand for: each its own, and those it says were left out."""
    left_out = [re.search(r"\((\d+) more since the last such line\)", line) for line in lines]
    return len(lines) + sum(int(found.group(1)) for found in left_out if found)


async def test_a_flood_of_refused_calls_writes_a_few_lines_that_count_the_rest(
    short_refusal_log: float, secured: tuple[Cluster, Clients], caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who reaches the port can be refused: a line per kind of refusal and method every
    interval, the next saying how many were left out, and one kind never hides another."""
    cluster, clients = secured
    caplog.set_level(logging.INFO, logger=interceptor.__name__)
    stub = ingest_pb2_grpc.IngestServiceStub(clients.raw(cluster.ingest_port))
    request = ipb.ListMediaRequest(owner_id="listing-7")
    wrong = [("authorization", "Bearer not-a-known-token-at-all")]
    flood = 300
    for _ in range(flood):
        error = await refusal(stub.ListMedia(request, metadata=wrong))
        assert_refused(error, UNAUTHENTICATED, "TOKEN_INVALID", None)
    # Other kinds during the flood still get their line.
    error = await refusal(stub.ListMedia(request))
    assert_refused(error, UNAUTHENTICATED, "TOKEN_MISSING", None)
    error = await refusal(clients.ingest("viewer").UploadMedia(image_upload("listing-7", 5)))
    assert_refused(error, PERMISSION_DENIED, "ROLE_NOT_ALLOWED", None)
    assert len(refusal_lines(caplog, "no bearer token")) == 1
    assert len(refusal_lines(caplog, "role not allowed")) == 1
    flooded = refusal_lines(caplog, "unknown token")
    assert 1 <= len(flooded) < flood / 10, flooded
    # Once the interval is over, the next refusal's line counts those left out.
    made = flood

    async def counted() -> bool:
        nonlocal made
        await refusal(stub.ListMedia(request, metadata=wrong))
        made += 1
        return "more since the last such line" in refusal_lines(caplog, "unknown token")[-1]

    await wait_until(counted, within=PATIENCE, interval=0.2)
    assert calls_told(refusal_lines(caplog, "unknown token")) == made
    # Refused callers changed nothing; an allowed one is served as before.
    uploaded = await clients.ingest("uploader7").UploadMedia(image_upload("listing-7", 6))
    listed = await clients.ingest("admin").ListMedia(request)
    assert [item.id for item in listed.media] == [uploaded.media[0].id]


# ---- roles ----


@pytest.mark.parametrize(
    ("who", "service", "method", "request_message"),
    [
        ("viewer", "ingest", "UploadMedia", image_upload("listing-7", 4)),
        ("service", "ingest", "UploadMedia", image_upload("listing-7", 4)),
        ("viewer", "ingest", "ReprocessMedia", ipb.ReprocessMediaRequest(media_ids=["x"])),
        ("uploader7", "analysis", "SubmitJobs", apb.SubmitJobsRequest()),
        ("viewer", "analysis", "RetryJobs", apb.RetryJobsRequest(media_ids=["x"])),
        ("viewer", "analysis", "PauseQueue", apb.PauseQueueRequest()),
        ("uploader7", "analysis", "ResumeQueue", apb.ResumeQueueRequest()),
        ("service", "analysis", "PauseQueue", apb.PauseQueueRequest()),
        # Role before existence: an unknown id is not NOT_FOUND for a caller without the role.
        ("service", "ingest", "GetMedia", ipb.GetMediaRequest(media_id="no-such-id")),
        ("service", "analysis", "GetJob", apb.GetJobRequest(media_id="no-such-id")),
    ],
)
async def test_a_role_that_does_not_cover_the_method_is_denied(
    secured: tuple[Cluster, Clients], who: str, service: str, method: str, request_message: Any
) -> None:
    _, clients = secured
    stub = clients.ingest(who) if service == "ingest" else clients.analysis(who)
    error = await refusal(getattr(stub, method)(request_message))
    assert_refused(error, PERMISSION_DENIED, "ROLE_NOT_ALLOWED", None)


def test_the_ingest_role_table_names_the_services_own_methods() -> None:
    # The table lives below the service (the web gateway checks uploads against it too),
    # apart from the proto: a renamed method would be callable by admin alone.
    service = ipb.DESCRIPTOR.services_by_name["IngestService"]
    methods = {f"/{service.full_name}/{method.name}" for method in service.methods}
    assert ingest_api.METHOD_ROLES is INGEST_METHOD_ROLES
    assert set(INGEST_METHOD_ROLES) <= methods
    assert methods - set(INGEST_METHOD_ROLES) == {f"/{service.full_name}/RetryWebhookDeliveries"}


async def test_admin_may_call_everything_and_unrestricted_callers_get_not_found(
    secured: tuple[Cluster, Clients],
) -> None:
    _, clients = secured
    analysis = clients.analysis("admin")
    assert (await analysis.PauseQueue(apb.PauseQueueRequest())).paused
    assert not (await analysis.ResumeQueue(apb.ResumeQueueRequest())).paused
    for who in ("admin", "viewer"):
        error = await refusal(clients.ingest(who).GetMedia(ipb.GetMediaRequest(media_id="nope")))
        assert error.code() == grpc.StatusCode.NOT_FOUND


# ---- owners, and the service token between the services ----


async def test_uploads_flow_through_both_services_with_the_service_token(
    secured: tuple[Cluster, Clients],
) -> None:
    """SubmitJobs (outbox), ReadMediaContent (fetcher) and WatchStatus (mirror) all pass."""
    _, clients = secured
    response = await clients.ingest("uploader7").UploadMedia(image_upload("listing-7", 10, 2))
    await completed(clients, [m.id for m in response.media])


async def test_an_owner_restricted_token_touches_only_its_owners(
    secured: tuple[Cluster, Clients],
) -> None:
    _, clients = secured
    uploader = clients.ingest("uploader7")
    mine = (await uploader.UploadMedia(image_upload("listing-7", 20))).media[0]
    theirs = (await clients.ingest("admin").UploadMedia(image_upload("listing-8", 21))).media[0]
    await completed(clients, [mine.id, theirs.id])

    error = await refusal(uploader.UploadMedia(image_upload("listing-8", 22)))
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")

    async def stream_for(owner: str) -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield ipb.UploadMediaStreamRequest(
            header=ipb.UploadHeader(owner_id=owner, filename="s.jpg")
        )
        yield ipb.UploadMediaStreamRequest(chunk=samples.jpeg_bytes(23))

    error = await refusal(uploader.UploadMediaStream(stream_for("listing-8")))
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "header.owner_id")
    streamed = await uploader.UploadMediaStream(stream_for("listing-7"))
    assert streamed.media.owner_id == "listing-7"

    # Another owner's item and an unknown id are refused alike: ids do not leak.
    for media_id in (theirs.id, "no-such-id"):
        for call in (
            uploader.GetMedia(ipb.GetMediaRequest(media_id=media_id)),
            uploader.ReprocessMedia(ipb.ReprocessMediaRequest(media_ids=[media_id])),
            clients.analysis("viewer7").GetJob(apb.GetJobRequest(media_id=media_id)),
        ):
            error = await refusal(call)
            assert error.code() == PERMISSION_DENIED
            assert media_id in (error.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in uploader.ReadMediaContent(
                ipb.ReadMediaContentRequest(media_id=media_id)
            ):
                pass
        assert_refused(caught.value, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "media_id")

    assert (await uploader.GetMedia(ipb.GetMediaRequest(media_id=mine.id))).media.id == mine.id
    content = b"".join(
        [
            r.data
            async for r in uploader.ReadMediaContent(ipb.ReadMediaContentRequest(media_id=mine.id))
        ]
    )
    assert hashlib.sha256(content).hexdigest() == mine.sha256
    again = await uploader.ReprocessMedia(ipb.ReprocessMediaRequest(media_ids=[mine.id]))
    assert list(again.media_ids) == [mine.id]

    # Lists: another owner is refused; no owner means the caller's only owner.
    error = await refusal(uploader.ListMedia(ipb.ListMediaRequest(owner_id="listing-8")))
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")
    listed = await uploader.ListMedia(ipb.ListMediaRequest())
    assert {m.owner_id for m in listed.media} == {"listing-7"}
    jobs = await clients.analysis("viewer7").ListJobs(apb.ListJobsRequest())
    assert {j.owner_id for j in jobs.jobs} == {"listing-7"}
    error = await refusal(
        clients.analysis("viewer7").ListJobs(apb.ListJobsRequest(owner_id="listing-8"))
    )
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")
    # Several owners: name one (each is allowed), or be refused.
    two = clients.analysis("viewer78")
    error = await refusal(two.ListJobs(apb.ListJobsRequest()))
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")
    assert (await two.ListJobs(apb.ListJobsRequest(owner_id="listing-8"))).jobs[0].owner_id == (
        "listing-8"
    )
    error = await refusal(clients.ingest("viewer78").ListMedia(ipb.ListMediaRequest()))
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")
    # A token that may see every owner lists them all, newest first.
    everyone = await clients.ingest("admin").ListMedia(ipb.ListMediaRequest())
    assert [m.id for m in everyone.media] == [streamed.media.id, theirs.id, mine.id]
    error = await refusal(uploader.ReprocessMedia(ipb.ReprocessMediaRequest(owner_id="listing-8")))
    assert_refused(error, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")


async def test_a_watcher_sees_only_the_owners_it_may_see(
    secured: tuple[Cluster, Clients],
) -> None:
    _, clients = secured
    admin = clients.ingest("admin")
    mine = (await admin.UploadMedia(image_upload("listing-7", 30))).media[0]
    theirs = (await admin.UploadMedia(image_upload("listing-8", 31))).media[0]
    third = (await admin.UploadMedia(image_upload("listing-9", 32))).media[0]
    await completed(clients, [mine.id, theirs.id, third.id])
    viewer7 = clients.analysis("viewer7")

    # Naming another owner is refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in viewer7.WatchStatus(apb.WatchStatusRequest(owner_id="listing-8")):
            pass
    assert_refused(caught.value, PERMISSION_DENIED, "OWNER_NOT_ALLOWED", "owner_id")

    async def initial_state(request: apb.WatchStatusRequest, who: str = "viewer7") -> set[str]:
        seen: set[str] = set()
        async for response in clients.analysis(who).WatchStatus(request):
            if response.HasField("change"):
                seen.add(response.change.media_id)
            elif response.bookmark.initial_state_end:
                return seen
        raise AssertionError("the stream ended before its initial state")

    # The state of everything, and of the other owner's id by name.
    everything = await initial_state(apb.WatchStatusRequest(send_initial_state=True))
    assert everything == {mine.id}
    named = await initial_state(
        apb.WatchStatusRequest(media_ids=[theirs.id, mine.id], send_initial_state=True)
    )
    assert named == {mine.id}
    # A token of several owners: the events of exactly those.
    two = await initial_state(apb.WatchStatusRequest(send_initial_state=True), "viewer78")
    assert two == {mine.id, theirs.id}
    # Both streams start from the same revision (catch-up, then live), so each gets every
    # change after it that its token may see, whenever its subscription began.
    status = await clients.analysis("admin").GetQueueStatus(apb.GetQueueStatusRequest())
    since = apb.WatchStatusRequest(start_revision=status.current_revision)
    live_mine = viewer7.WatchStatus(since)
    live_all = clients.analysis("viewer").WatchStatus(since)

    # Live: reprocess both items; the restricted watcher gets only its owner's events.
    await admin.ReprocessMedia(ipb.ReprocessMediaRequest(media_ids=[theirs.id, mine.id]))

    async def changes_until_both_done(stream: Any) -> list[apb.StatusChange]:
        got: list[apb.StatusChange] = []
        async for response in stream:
            if response.HasField("change"):
                got.append(response.change)
                done = {c.media_id for c in got if c.status == apb.PROCESSING_STATUS_COMPLETED}
                if done >= {mine.id, theirs.id} or (stream is live_mine and done >= {mine.id}):
                    return got
        return got

    seen_all = await asyncio.wait_for(changes_until_both_done(live_all), PATIENCE)
    assert {c.owner_id for c in seen_all} == {"listing-7", "listing-8"}
    seen_mine = await asyncio.wait_for(changes_until_both_done(live_mine), PATIENCE)
    assert {c.owner_id for c in seen_mine} == {"listing-7"}
    # Everything the unrestricted watcher saw of listing-8 was left out for viewer7; its own
    # owner's changes all arrived.
    assert [c.media_id for c in seen_mine] == [
        c.media_id for c in seen_all if c.owner_id == "listing-7"
    ]
    live_mine.cancel()
    live_all.cancel()

    # From revision 1, another owner's id by name: its whole history is left out, so the
    # first message is the idle bookmark, past every change; the unrestricted viewer gets
    # the history of the same id.
    async def first_message(who: str) -> apb.WatchStatusResponse:
        call = clients.analysis(who).WatchStatus(
            apb.WatchStatusRequest(start_revision=1, media_ids=[theirs.id])
        )
        try:
            async for response in call:
                return response
        finally:
            call.cancel()
        raise AssertionError("the stream ended")

    hidden = await asyncio.wait_for(first_message("viewer7"), PATIENCE)
    assert not hidden.HasField("change")
    assert hidden.HasField("bookmark")
    shown = await asyncio.wait_for(first_message("viewer"), PATIENCE)
    assert shown.change.media_id == theirs.id


# ---- the tokens file ----


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ('[[tokens]]\nname = "a"\ntoken = "short"\nroles = ["viewer"]\n', "at least 16"),
        ('[[tokens]]\nname = "a"\ntoken = "0123456789abcdefgh"\nroles = ["root"]\n', "root"),
        ('[[tokens]]\nname = "a"\ntoken = "0123456789abcdefgh"\n', "roles"),
        ('[[tokens]]\ntoken = "0123456789abcdefgh"\nroles = ["admin"]\n', "name"),
        (
            '[[tokens]]\nname = "a"\ntoken = "0123456789abcdefgh"\nroles = ["admin"]\n'
            '[[tokens]]\nname = "b"\ntoken = "0123456789abcdefgh"\nroles = ["viewer"]\n',
            "same token",
        ),
        ('[[tokens]]\nname = "a"\ntoken_sha256 = "abc"\nroles = ["admin"]\n', "64 hex"),
        ("tokens = 1\n", "no [[tokens]]"),
        ("[[tokens]\n", "not valid TOML"),
    ],
)
def test_a_bad_tokens_file_is_refused_without_quoting_tokens(
    tmp_path: Path, body: str, complaint: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(body)
    with pytest.raises(TokensFileError) as caught:
        load_tokens(path)
    assert complaint in str(caught.value)
    assert "0123456789abcdefgh" not in str(caught.value)


def test_the_token_table_finds_each_principal(tmp_path: Path) -> None:
    table = load_tokens(tokens_file(tmp_path))
    assert len(table) == len(TOKENS)
    found = table.authenticate(TOKENS["uploader7"])
    assert found is not None
    assert (found.name, found.roles, found.owners) == (
        "listing-7-app",
        frozenset({"uploader"}),
        frozenset({"listing-7"}),
    )
    hashed = table.authenticate(TOKENS["hashed"])
    assert hashed is not None
    assert hashed.name == "hashed-viewer"
    assert table.authenticate(TOKENS["hashed"][:-1]) is None
    assert table.authenticate("") is None


# ---- --insecure and the CLI ----


def _serve(argv: list[str], env: dict[str, str] | None = None) -> Any:
    return serve_settings(parse(["serve", *argv]), ("ingest", "analysis"), env or {})


def test_binding_beyond_loopback_without_tokens_needs_insecure(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--insecure"):
        _serve(["--host", "0.0.0.0"])
    with pytest.raises(SettingsError, match="--insecure"):
        _serve([], {"MEDIATAG_HOST": "192.0.2.7"})
    assert _serve(["--host", "0.0.0.0", "--insecure"]).ingest.host == "0.0.0.0"
    assert (
        _serve([], {"MEDIATAG_HOST": "0.0.0.0", "MEDIATAG_INSECURE": "1"}).ingest.tokens_file
        is None
    )
    path = tokens_file(tmp_path)
    settings = _serve(
        ["--host", "0.0.0.0", "--tokens-file", str(path), "--service-token", TOKENS["service"]]
    )
    assert settings.ingest.tokens_file == path == settings.analysis.tokens_file
    assert settings.ingest.service_token == TOKENS["service"]
    assert TOKENS["service"] not in repr(settings)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert _serve(["--host", host]).ingest.host == host


@pytest.mark.parametrize(
    ("config_type", "create_server"),
    [(IngestConfig, create_ingest), (AnalysisConfig, create_analysis)],
    ids=["ingest", "analysis"],
)
async def test_a_server_built_in_code_refuses_an_exposed_address_without_tokens(
    tmp_path: Path,
    config_type: type[IngestConfig | AnalysisConfig],
    create_server: Callable[..., Awaitable[object]],
) -> None:
    """The rule is the config's, so `create_server` callers get it too, not only the CLI."""
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="--insecure"):
        await create_server(config_type(host="0.0.0.0", port=0, data_dir=data_dir))
    accepted = config_type(host="0.0.0.0", port=0, data_dir=data_dir, insecure=True)
    with pytest.raises(ValueError, match="--insecure"):
        replace(accepted, insecure=False)
    assert not data_dir.exists()
    assert replace(accepted, insecure=False, tokens_file=tokens_file(tmp_path)).tokens_file


def test_a_service_token_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tokens_file(tmp_path)
    secret = tmp_path / "service.token"
    secret.write_text(TOKENS["service"] + "\n")
    from_file = _serve(["--tokens-file", str(path), "--service-token-file", str(secret)])
    assert from_file.analysis.service_token == TOKENS["service"]
    from_env = _serve([], {"MEDIATAG_TOKENS_FILE": str(path), "MEDIATAG_SERVICE_TOKEN": "s" * 20})
    assert from_env.ingest.service_token == "s" * 20
    # Both services in one process call each other: with tokens they need the service token.
    with pytest.raises(SettingsError, match="service token"):
        _serve(["--tokens-file", str(path)])


async def test_the_cli_sends_its_token(
    secured: tuple[Cluster, Clients],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, clients = secured
    await clients.ingest("uploader7").UploadMedia(image_upload("listing-7", 40))
    addresses = [
        "--ingest", f"127.0.0.1:{cluster.ingest_port}",
        "--analysis", f"127.0.0.1:{cluster.analysis_port}",
    ]  # fmt: skip
    monkeypatch.delenv("MEDIATAG_TOKEN", raising=False)
    assert await run_client(["ls", "--owner", "listing-7", *addresses]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert (
        await run_client(["ls", "--owner", "listing-7", "--token", TOKENS["viewer7"], *addresses])
        == 0
    )
    assert "0.jpg" in capsys.readouterr().out
    monkeypatch.setenv("MEDIATAG_TOKEN", TOKENS["viewer7"])
    assert await run_client(["ls", "--owner", "listing-8", "--json", *addresses]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert await run_client(["queue", "--json", *addresses]) == 0
