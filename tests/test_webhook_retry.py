"""Dead webhook deliveries through the ingest API, the gateway's JSON and the CLI: listed
(owner-scoped, paged), retried by an admin, and then delivered: nothing a refusing receiver
missed is lost. Deliveries to an endpoint removed from the webhooks file are dead at once,
and retried once it is back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from analysis_service.config import AnalysisConfig, RateLimitConfig
from ingest_service.config import IngestConfig, WebhookConfig
from ingest_service.domain.webhooks import ENDPOINT_REMOVED
from mediatag_cli.main import run_client
from mediatag_common.grpc_server import open_channel
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.test_auth import TOKENS, TOKENS_TOML, Clients, image_upload
from tests.test_ingest_service import assert_refused, refusal
from tests.test_metrics import expect
from tests.test_web_api import error_info, violated_fields
from tests.test_web_security import bearer
from tests.test_webhooks import Receiver, endpoints_file, stored_deliveries, upload, verified
from tests.web_support import Gateways, web_config

DEAD = ipb.WEBHOOK_DELIVERY_STATE_DEAD
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# An admin restricted to one owner, beside the tokens of the auth tests.
ADMIN7_TOKEN = "admin7-token-0123456789"
ADMIN7_TOML = f"""
[[tokens]]
name = "listing-7-ops"
token = "{ADMIN7_TOKEN}"
roles = ["admin"]
owners = ["listing-7"]
"""


def dying_webhooks(file: Path) -> WebhookConfig:
    """Deliveries retried for a fraction of a second, then dead."""
    return WebhookConfig(
        file=file, initial_backoff=0.05, max_backoff=0.1, retry_period=0.3, poll_interval=0.1
    )


@dataclass
class Refused:
    cluster: Cluster
    clients: Clients
    # Stub of the admin restricted to listing-7.
    admin7: ingest_pb2_grpc.IngestServiceAsyncStub
    receiver: Receiver
    media_ids: list[str]
    tokens_file: Path


@pytest.fixture
async def refused(make_cluster: Callable[..., Cluster], tmp_path: Path) -> AsyncIterator[Refused]:
    """Both services with tokens; a receiver refusing every webhook (HTTP 500) until the
    test says otherwise, so the deliveries of three items (two of listing-7, one of
    listing-8) are dead."""
    receiver = Receiver(script={"hooks": [500]})
    await receiver.start()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML + ADMIN7_TOML)
    hooks = endpoints_file(tmp_path / "hooks.toml", {"hooks": receiver.url("hooks")})
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(
            rate_limits={"local": RateLimitConfig(100, 10)},
            tokens_file=tokens,
            service_token=TOKENS["service"],
        ),
        ingest_config=IngestConfig(
            tokens_file=tokens, service_token=TOKENS["service"], webhooks=dying_webhooks(hooks)
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    clients = Clients(cluster)
    admin = clients.ingest("admin")
    uploaded = await admin.UploadMedia(image_upload("listing-7", 0, n=2), timeout=PATIENCE)
    other = await admin.UploadMedia(image_upload("listing-8", 10), timeout=PATIENCE)
    media_ids = [m.id for m in [*uploaded.media, *other.media]]

    async def all_dead() -> bool:
        listed = await admin.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(state=DEAD), timeout=PATIENCE
        )
        return len(listed.deliveries) == 3

    await wait_until(all_dead)
    async with open_channel(f"127.0.0.1:{cluster.ingest_port}", token=ADMIN7_TOKEN) as channel:
        admin7 = ingest_pb2_grpc.IngestServiceStub(channel)
        yield Refused(cluster, clients, admin7, receiver, media_ids, tokens)
    await clients.close()
    await receiver.stop()


async def test_dead_deliveries_are_listed_to_whom_may_see_their_owners(
    refused: Refused,
) -> None:
    clients = refused.clients
    viewer = clients.ingest("viewer")
    listed = await viewer.ListWebhookDeliveries(
        ipb.ListWebhookDeliveriesRequest(), timeout=PATIENCE
    )
    assert {d.media_id for d in listed.deliveries} == set(refused.media_ids)
    for delivery in listed.deliveries:
        assert delivery.state == DEAD
        assert (delivery.endpoint, delivery.status) == ("hooks", ipb.PROCESSING_STATUS_COMPLETED)
        assert delivery.last_error == "HTTP 500"
        assert delivery.attempts >= 1
        assert delivery.message_id == f"msg_{delivery.media_id}_{delivery.revision}"
        assert delivery.HasField("dead_time")
        assert not delivery.HasField("next_attempt_time")
    ids = [d.id for d in listed.deliveries]
    assert ids == sorted(ids, reverse=True)
    retrying = await viewer.ListWebhookDeliveries(
        ipb.ListWebhookDeliveriesRequest(state=ipb.WEBHOOK_DELIVERY_STATE_RETRYING),
        timeout=PATIENCE,
    )
    assert list(retrying.deliveries) == []

    # Owner-restricted callers see their owners' only.
    viewer7 = clients.ingest("viewer7")
    sevens = await viewer7.ListWebhookDeliveries(
        ipb.ListWebhookDeliveriesRequest(), timeout=PATIENCE
    )
    assert {d.owner_id for d in sevens.deliveries} == {"listing-7"}
    assert len(sevens.deliveries) == 2
    eights = await clients.ingest("viewer78").ListWebhookDeliveries(
        ipb.ListWebhookDeliveriesRequest(owner_id="listing-8"), timeout=PATIENCE
    )
    assert {d.owner_id for d in eights.deliveries} == {"listing-8"}

    # Paged one by one with signed tokens.
    seen: list[int] = []
    token = ""
    while True:
        page = await viewer.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(state=DEAD, page_size=1, page_token=token),
            timeout=PATIENCE,
        )
        seen.extend(d.id for d in page.deliveries)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids

    first = await viewer.ListWebhookDeliveries(
        ipb.ListWebhookDeliveriesRequest(page_size=1), timeout=PATIENCE
    )
    refusals = [
        (viewer7, ipb.ListWebhookDeliveriesRequest(owner_id="listing-8"), DENIED),
        (viewer, ipb.ListWebhookDeliveriesRequest(page_size=-1), INVALID),
        (viewer, ipb.ListWebhookDeliveriesRequest(page_token="forged"), INVALID),
        # A token is good for the filters it was issued for only.
        (
            viewer,
            ipb.ListWebhookDeliveriesRequest(page_token=first.next_page_token, endpoint="hooks"),
            INVALID,
        ),
        (viewer, ipb.ListWebhookDeliveriesRequest(state=7), INVALID),  # type: ignore[arg-type]
        (viewer, ipb.ListWebhookDeliveriesRequest(owner_id="bad owner"), INVALID),
    ]
    expected = [
        ("OWNER_NOT_ALLOWED", "owner_id"),
        ("INVALID_PAGE_SIZE", "page_size"),
        ("INVALID_PAGE_TOKEN", "page_token"),
        ("INVALID_PAGE_TOKEN", "page_token"),
        ("INVALID_STATE", "state"),
        ("INVALID_OWNER_ID", "owner_id"),
    ]
    for (stub, request, code), (reason, field) in zip(refusals, expected, strict=True):
        assert_refused(
            await refusal(stub.ListWebhookDeliveries(request, timeout=PATIENCE)),
            code,
            reason,
            field,
        )
    uploader = clients.ingest("uploader7")
    assert_refused(
        await refusal(
            uploader.ListWebhookDeliveries(ipb.ListWebhookDeliveriesRequest(), timeout=PATIENCE)
        ),
        DENIED,
        "ROLE_NOT_ALLOWED",
        None,
    )


async def test_an_admin_retries_dead_deliveries_and_nothing_is_lost(refused: Refused) -> None:
    cluster, clients, receiver = refused.cluster, refused.clients, refused.receiver
    admin, admin7 = clients.ingest("admin"), refused.admin7
    listed = await admin.ListWebhookDeliveries(ipb.ListWebhookDeliveriesRequest(), timeout=PATIENCE)
    by_owner = {d.owner_id: d.id for d in listed.deliveries}
    retry = ipb.RetryWebhookDeliveriesRequest
    refusals = [
        (clients.ingest("viewer"), retry(endpoint="hooks"), DENIED, "ROLE_NOT_ALLOWED", None),
        (admin, retry(), INVALID, "FILTER_REQUIRED", "delivery_ids"),
        (
            admin,
            retry(delivery_ids=range(1, 1002)),
            INVALID,
            "TOO_MANY_DELIVERY_IDS",
            "delivery_ids",
        ),
        (admin, retry(endpoint="nope"), NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND", "endpoint"),
        (
            admin,
            retry(delivery_ids=[by_owner["listing-8"], 10**12]),
            NOT_FOUND,
            "WEBHOOK_DELIVERY_NOT_FOUND",
            "delivery_ids[1]",
        ),
        # An admin restricted to listing-7 may not touch listing-8's delivery.
        (
            admin7,
            retry(delivery_ids=[by_owner["listing-8"]]),
            DENIED,
            "OWNER_NOT_ALLOWED",
            "delivery_ids[0]",
        ),
    ]
    for stub, request, code, reason, field in refusals:
        error = await refusal(stub.RetryWebhookDeliveries(request, timeout=PATIENCE))
        assert_refused(error, code, reason, field)
    # Refused retries revived nothing: all three are still dead.
    still = await admin.ListWebhookDeliveries(
        ipb.ListWebhookDeliveriesRequest(state=DEAD), timeout=PATIENCE
    )
    assert len(still.deliveries) == 3

    receiver.script["hooks"] = [200]
    refused_so_far = len(receiver.received["hooks"])
    # The restricted admin's "every dead one of the endpoint" is its owners' two.
    sevens = await admin7.RetryWebhookDeliveries(retry(endpoint="hooks"), timeout=PATIENCE)
    assert sevens.count == 2

    async def sevens_delivered() -> bool:
        return stored_deliveries(cluster) == 1

    await wait_until(sevens_delivered)
    answer = await admin.RetryWebhookDeliveries(
        retry(delivery_ids=[by_owner["listing-8"]]), timeout=PATIENCE
    )
    assert answer.count == 1

    async def all_delivered() -> bool:
        return stored_deliveries(cluster) == 0

    await wait_until(all_delivered)
    # Every change reached the receiver, signed, once it accepted them.
    accepted = receiver.received["hooks"][refused_so_far:]
    assert {verified("hooks", r)["data"]["mediaId"] for r in accepted} == set(refused.media_ids)
    empty = await admin.ListWebhookDeliveries(ipb.ListWebhookDeliveriesRequest(), timeout=PATIENCE)
    assert list(empty.deliveries) == []


async def test_the_gateway_lists_and_retries_them_as_json(
    refused: Refused, gateways: Gateways
) -> None:
    cluster, receiver = refused.cluster, refused.receiver
    web = await gateways.start(
        web_config(cluster, tokens_file=refused.tokens_file, service_token=TOKENS["service"])
    )
    listed = await web.ok(
        "GET",
        "/api/v1/webhookDeliveries?state=WEBHOOK_DELIVERY_STATE_DEAD&page_size=2",
        headers=bearer("viewer"),
    )
    first = listed["deliveries"][0]
    assert (first["endpoint"], first["state"], first["lastError"]) == (
        "hooks",
        "WEBHOOK_DELIVERY_STATE_DEAD",
        "HTTP 500",
    )
    assert first["status"] == "PROCESSING_STATUS_COMPLETED"
    assert first["id"].isdigit()  # int64 as a string, as proto3 JSON has it
    assert first["deadTime"].endswith("Z")
    assert listed["nextPageToken"]

    path = "/api/v1/webhookDeliveries:retry"
    status, answer = await web.json("POST", path, json={}, headers=bearer("admin"))
    assert (status, error_info(answer)["reason"]) == (400, "FILTER_REQUIRED")
    assert violated_fields(answer) == ["delivery_ids"]
    status, answer = await web.json(
        "POST", path, json={"endpoint": "hooks"}, headers=bearer("viewer")
    )
    assert (status, error_info(answer)["reason"]) == (403, "ROLE_NOT_ALLOWED")
    status, answer = await web.json(
        "POST", path, json={"deliveryIds": ["999999999"]}, headers=bearer("admin")
    )
    assert (status, error_info(answer)["reason"]) == (404, "WEBHOOK_DELIVERY_NOT_FOUND")
    assert violated_fields(answer) == ["delivery_ids[0]"]

    receiver.script["hooks"] = [200]
    retried = await web.ok("POST", path, json={"endpoint": "hooks"}, headers=bearer("admin"))
    assert retried == {"count": 3}

    async def all_delivered() -> bool:
        return stored_deliveries(cluster) == 0

    await wait_until(all_delivered)


async def test_the_cli_lists_and_retries_them(
    refused: Refused, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, receiver = refused.cluster, refused.receiver
    address = ["--ingest", f"127.0.0.1:{cluster.ingest_port}"]
    monkeypatch.setenv("MEDIATAG_TOKEN", TOKENS["viewer7"])
    assert await run_client(["webhooks", "--state", "dead", *address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID", "ENDPOINT", "MEDIA", "OWNER", "CHANGE", "STATE", "ATTEMPTS", "WHEN", "ERROR"
    ]  # fmt: skip
    # The restricted viewer's two, one line each, newest first, with the receiver's answer.
    assert [line.split()[3] for line in lines[1:]] == ["listing-7", "listing-7"]
    assert all(line.endswith("HTTP 500") for line in lines[1:])
    assert await run_client(["retry-webhooks", "--endpoint", "hooks", *address]) == 1
    assert "PERMISSION_DENIED ROLE_NOT_ALLOWED" in capsys.readouterr().err

    receiver.script["hooks"] = [200]
    monkeypatch.setenv("MEDIATAG_TOKEN", TOKENS["admin"])
    assert await run_client(["retry-webhooks", "--endpoint", "hooks", "--json", *address]) == 0
    assert json.loads(capsys.readouterr().out) == {"count": 3}

    async def all_delivered() -> bool:
        return stored_deliveries(cluster) == 0

    await wait_until(all_delivered)
    assert await run_client(["webhooks", *address]) == 0
    assert capsys.readouterr().out == "no webhook deliveries waiting\n"


@pytest.mark.parametrize("removed_by", ["restart", "reload"])
async def test_deliveries_to_a_removed_endpoint_are_dead_until_it_is_back_and_retried(
    make_cluster: Callable[..., Cluster],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    removed_by: str,
) -> None:
    """Retrying deliveries (a long retry period) of an endpoint the service is restarted, or
    reloads its file, without: dead at once, with why, listed and counted so; retried by
    hand once a file names the endpoint again."""
    receiver = Receiver(script={"billing": [500]})
    await receiver.start()
    urls = {"billing": receiver.url("billing"), "other": receiver.url("other")}
    file = endpoints_file(tmp_path / "hooks.toml", urls)
    metrics_port = free_port()
    hooks = WebhookConfig(
        file=file, initial_backoff=0.05, max_backoff=0.1, poll_interval=0.1, reload_interval=0.1
    )
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(100, 10)}),
        ingest_config=IngestConfig(webhooks=hooks, metrics_port=metrics_port),
    )
    ingest = cluster.ingest
    address = ["--ingest", f"127.0.0.1:{cluster.ingest_port}"]
    try:
        await cluster.start_analysis()
        await cluster.start_ingest()
        media_ids = await upload(cluster, range(2))

        async def billing_refused_both() -> bool:
            refused = {
                verified("billing", r)["data"]["mediaId"] for r in receiver.received["billing"]
            }
            return refused == set(media_ids) and stored_deliveries(cluster) == 2

        await wait_until(billing_refused_both)
        endpoints_file(file, {"other": urls["other"]})
        if removed_by == "restart":
            await cluster.stop_ingest()
            await cluster.start_ingest()

        async def billing_dead() -> bool:
            listed = await ingest.ListWebhookDeliveries(
                ipb.ListWebhookDeliveriesRequest(state=DEAD, endpoint="billing"), timeout=PATIENCE
            )
            return len(listed.deliveries) == 2

        await wait_until(billing_dead)
        listed = await ingest.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(), timeout=PATIENCE
        )
        assert {d.media_id for d in listed.deliveries} == set(media_ids)
        for delivery in listed.deliveries:
            assert (delivery.endpoint, delivery.state) == ("billing", DEAD)
            assert delivery.last_error == ENDPOINT_REMOVED
            assert delivery.attempts >= 1
            assert delivery.HasField("dead_time")
            assert not delivery.HasField("next_attempt_time")
        await expect(metrics_port, "mediatag_webhook_backlog", 2, endpoint="billing", state="dead")
        await expect(
            metrics_port, "mediatag_webhook_backlog", 0, endpoint="billing", state="pending"
        )
        assert await run_client(["webhooks", "--state", "retrying", *address]) == 0
        assert capsys.readouterr().out == "no webhook deliveries waiting\n"
        # Not named, so not retried: there is nothing to send them to.
        assert await run_client(["retry-webhooks", "--endpoint", "billing", *address]) == 1
        assert "NOT_FOUND WEBHOOK_ENDPOINT_NOT_FOUND" in capsys.readouterr().err

        receiver.script["billing"] = [200]
        endpoints_file(file, urls)

        async def retried() -> bool:
            code = await run_client(["retry-webhooks", "--endpoint", "billing", "--json", *address])
            out, _ = capsys.readouterr()
            # Refused (NOT_FOUND) until the reload names billing; then both were still dead.
            return code == 0 and json.loads(out) == {"count": 2}

        await wait_until(retried)

        async def all_delivered() -> bool:
            return stored_deliveries(cluster) == 0

        await wait_until(all_delivered)
        accepted = receiver.received["billing"][-2:]
        assert {verified("billing", r)["data"]["mediaId"] for r in accepted} == set(media_ids)
    finally:
        await receiver.stop()
