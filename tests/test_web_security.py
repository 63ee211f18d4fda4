"""The web gateway's security: bearer tokens and browser sessions, CSRF, owners in the list,
the content and the events, response headers, TLS with a Secure cookie."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from ingest_service.config import IngestConfig
from mediatag_common.tls import ServiceTls
from tests.conftest import Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes, png_bytes
from tests.test_auth import TOKENS, tokens_file
from tests.test_web_api import error_info, violated_fields
from tests.tls_support import make_pki
from tests.web_support import (
    EventStream,
    Gateways,
    Web,
    form,
    open_events,
    slow_upload,
    web_config,
)
from web_gateway.api.headers import CONTENT_SECURITY_POLICY
from web_gateway.config import WebConfig


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture
async def secured(make_cluster: Callable[..., Cluster], tmp_path: Path) -> tuple[Cluster, Path]:
    """Both services with the tokens file, reaching each other with the service token."""
    path = tokens_file(tmp_path / "secrets")
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64),
        analysis_config=AnalysisConfig(
            embedding_dimensions=64,
            rate_limits={"local": RateLimitConfig(100, 10)},
            watch=WatchConfig(bookmark_interval=0.3),
            tokens_file=path,
            service_token=TOKENS["service"],
        ),
        ingest_config=IngestConfig(tokens_file=path, service_token=TOKENS["service"]),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    return cluster, path


@pytest.fixture
async def web(secured: tuple[Cluster, Path], gateways: Gateways) -> Web:
    cluster, path = secured
    return await gateways.start(
        web_config(cluster, tokens_file=path, service_token=TOKENS["service"])
    )


async def upload_as(web: Web, who: str, owner: str, seed: int) -> str:
    answer = await web.ok(
        "POST",
        "/api/v1/media",
        headers=bearer(who),
        data=form({"owner_id": owner}, [(f"{seed}.jpg", jpeg_bytes(seed), "image/jpeg")]),
    )
    media_id: str = answer["media"][0]["id"]
    return media_id


async def refused(web: Web, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    status, answer = await web.json(method, path, **kwargs)
    return status, error_info(answer)["reason"]


async def test_the_api_needs_a_token_and_passes_the_services_refusals_on(web: Web) -> None:
    assert await refused(web, "GET", "/api/v1/queue") == (401, "TOKEN_MISSING")
    bad = {"Authorization": "Bearer not-a-token-at-all"}
    assert await refused(web, "GET", "/api/v1/queue", headers=bad) == (401, "TOKEN_INVALID")
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert await refused(web, "GET", "/api/v1/queue", headers=basic) == (401, "TOKEN_INVALID")

    assert (await web.ok("GET", "/api/v1/queue", headers=bearer("viewer")))["paused"] is False
    # A viewer sees but cannot act: the services refuse it, and nothing changes.
    for path in ("/api/v1/queue:pause", "/api/v1/media:reprocess"):
        assert await refused(
            web, "POST", path, headers=bearer("viewer"), json={"status": "PROCESSING_STATUS_FAILED"}
        ) == (403, "ROLE_NOT_ALLOWED")
    upload = form({"owner_id": "listing-7"}, [("a.jpg", jpeg_bytes(1), "image/jpeg")])
    status, reason = await refused(
        web, "POST", "/api/v1/media", headers=bearer("viewer"), data=upload
    )
    assert (status, reason) == (403, "ROLE_NOT_ALLOWED")
    assert (await web.ok("GET", "/api/v1/queue", headers=bearer("admin")))["paused"] is False
    listed = await web.ok("GET", "/api/v1/media?owner_id=listing-7", headers=bearer("admin"))
    assert listed["media"] == []

    assert (await web.ok("POST", "/api/v1/queue:pause", headers=bearer("admin")))["paused"]
    assert (await web.ok("GET", "/api/v1/queue", headers=bearer("viewer")))["paused"] is True


async def test_an_upload_of_a_caller_that_may_not_upload_is_refused_before_its_body(
    secured: tuple[Cluster, Path], gateways: Gateways
) -> None:
    """The gateway answers a viewer's upload 403 as ingest would, while the client has sent
    only the start of its body: the rest is never read, and no upload place is taken."""
    cluster, path = secured
    # A body the gateway waited for would end in UPLOAD_STALLED (504) after a second.
    web = await gateways.start(
        web_config(
            cluster, tokens_file=path, service_token=TOKENS["service"], upload_idle_timeout=1.0
        )
    )
    never = asyncio.Event()
    large = png_bytes(80) + bytes(8 * 1024 * 1024)
    status, answer = await slow_upload(web, "listing-7", "big.png", large, never, bearer("viewer"))
    assert (status, error_info(answer)["reason"]) == (403, "ROLE_NOT_ALLOWED")
    assert violated_fields(answer) == []
    assert "UploadMedia needs one of the roles admin, uploader" in answer["message"]
    assert web.host.gateway.uploads_in_progress == 0
    # An uploader's upload goes on as before, and nothing of the viewer's is stored.
    uploaded = await upload_as(web, "uploader7", "listing-7", 81)
    listed = await web.ok("GET", "/api/v1/media?owner_id=listing-7", headers=bearer("admin"))
    assert [item["id"] for item in listed["media"]] == [uploaded]


async def changes_until(stream: EventStream, media_id: str, status: str) -> list[tuple[str, str]]:
    """(owner, media id) of each change received until ``media_id`` reaches ``status``."""
    found: list[tuple[str, str]] = []
    while True:
        (event,) = await stream.changes(1)
        change = event.json["change"]
        found.append((change["ownerId"], change["mediaId"]))
        if change["mediaId"] == media_id and change["status"] == status:
            return found


async def test_an_owner_restricted_token_sees_only_its_owners(web: Web) -> None:
    viewer7 = await open_events(web, "", **bearer("viewer7"))
    viewer78 = await open_events(web, "", **bearer("viewer78"))
    other = await upload_as(web, "admin", "listing-8", seed=8)
    own = await upload_as(web, "admin", "listing-7", seed=7)
    named = await open_events(web, f"?media_ids={other}&media_ids={own}", **bearer("viewer7"))

    completed = "PROCESSING_STATUS_COMPLETED"
    # listing-8's changes came first; the restricted streams left them out.
    assert set(await changes_until(viewer7, own, completed)) == {("listing-7", own)}
    assert set(await changes_until(named, own, completed)) <= {("listing-7", own)}
    both = set(await changes_until(viewer78, own, completed))
    assert ("listing-8", other) in both

    status, answer = await web.json(
        "GET", "/api/v1/events?owner_id=listing-8", headers=bearer("viewer7")
    )
    assert (status, error_info(answer)["reason"]) == (403, "OWNER_NOT_ALLOWED")
    assert violated_fields(answer) == ["owner_id"]
    for path in ("/api/v1/media?owner_id=listing-8", f"/api/v1/media/{other}/content"):
        assert await refused(web, "GET", path, headers=bearer("viewer7")) == (
            403,
            "OWNER_NOT_ALLOWED",
        )
    async with web.client.get(
        f"{web.url}/api/v1/media/{own}/content", headers=bearer("viewer7")
    ) as response:
        assert response.status == 200
        assert await response.read() == jpeg_bytes(7)


def cookie_of(response: aiohttp.ClientResponse) -> str:
    return str(response.headers["Set-Cookie"])


async def test_a_browser_session_takes_the_token_once_and_guards_against_csrf(
    web: Web,
) -> None:
    wrong = await web.client.post(f"{web.url}/api/v1/session", json={"token": "x" * 20})
    assert wrong.status == 401
    assert "Set-Cookie" not in wrong.headers
    as_form = await web.client.post(f"{web.url}/api/v1/session", data={"token": TOKENS["admin"]})
    assert (as_form.status, error_info(await as_form.json())["reason"]) == (400, "JSON_REQUIRED")

    async with web.client.post(
        f"{web.url}/api/v1/session", json={"token": TOKENS["admin"]}
    ) as response:
        assert response.status == 200
        signed_in = await response.json()
        cookie = cookie_of(response)
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback
    assert signed_in["principal"] == {"name": "ops", "roles": ["admin"], "owners": None}
    csrf = signed_in["csrfToken"]

    # The cookie alone reads, and opens event streams (EventSource sends no headers).
    assert (await web.ok("GET", "/api/v1/queue"))["paused"] is False
    (await open_events(web)).close()
    # Changing anything needs the session's CSRF token, from this origin.
    assert await refused(web, "POST", "/api/v1/queue:pause") == (403, "CSRF_TOKEN_INVALID")
    wrong_token = {"X-CSRF-Token": "x" * 43}
    assert await refused(web, "POST", "/api/v1/queue:pause", headers=wrong_token) == (
        403,
        "CSRF_TOKEN_INVALID",
    )
    elsewhere = {"X-CSRF-Token": csrf, "Origin": "http://attacker.example"}
    assert await refused(web, "POST", "/api/v1/queue:pause", headers=elsewhere) == (
        403,
        "CROSS_ORIGIN",
    )
    assert (await web.ok("GET", "/api/v1/queue"))["paused"] is False
    own = {"X-CSRF-Token": csrf, "Origin": web.url}
    assert (await web.ok("POST", "/api/v1/queue:pause", headers=own))["paused"] is True

    session_id = web.client.cookie_jar.filter_cookies(URL(web.url))["mediatag_session"].value
    async with web.client.delete(f"{web.url}/api/v1/session", headers=own) as response:
        assert response.status == 204
    assert await refused(web, "GET", "/api/v1/queue") == (401, "TOKEN_MISSING")
    old = {"Cookie": f"mediatag_session={session_id}"}
    assert await refused(web, "GET", "/api/v1/queue", headers=old) == (401, "SESSION_EXPIRED")


async def test_one_caller_holds_at_most_its_share_of_the_uploads_in_progress(
    secured: tuple[Cluster, Path], gateways: Gateways
) -> None:
    cluster, path = secured
    web = await gateways.start(
        web_config(
            cluster, tokens_file=path, service_token=TOKENS["service"], max_concurrent_uploads=4
        )
    )
    may_finish = asyncio.Event()
    slow = [
        slow_upload(
            web, "listing-7", f"slow-{n}.png", png_bytes(70 + n), may_finish, bearer("uploader7")
        )
        for n in range(2)
    ]

    async def both_in_progress() -> bool:
        return web.host.gateway.uploads_in_progress == 2

    try:
        await wait_until(both_in_progress)
        status, answer = await web.json(
            "POST",
            "/api/v1/media",
            headers=bearer("uploader7"),
            data=form({"owner_id": "listing-7"}, [("third.jpg", jpeg_bytes(72), "image/jpeg")]),
        )
        assert (status, error_info(answer)["reason"]) == (429, "TOO_MANY_UPLOADS_FOR_CALLER")
        assert error_info(answer)["metadata"] == {"maxUploadsPerCaller": "2"}
        # Another caller uploads meanwhile; the held uploads finish, and nothing is lost.
        other = await upload_as(web, "admin", "listing-7", 73)
        may_finish.set()
        answers = [await upload for upload in slow]
        assert [status for status, _ in answers] == [200, 200]
        listed = await web.ok("GET", "/api/v1/media?owner_id=listing-7", headers=bearer("admin"))
        assert sorted(item["filename"] for item in listed["media"]) == [
            "73.jpg",
            "slow-0.png",
            "slow-1.png",
        ]
        assert other in {item["id"] for item in listed["media"]}
        assert web.host.gateway.uploads_in_progress == 0
    finally:
        may_finish.set()
        await asyncio.gather(*slow, return_exceptions=True)


async def test_responses_carry_a_strict_content_security_policy(web: Web) -> None:
    async with web.client.get(f"{web.url}/") as page:
        assert page.status == 200
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY
        assert page.headers["X-Frame-Options"] == "DENY"
    async with web.client.get(f"{web.url}/api/v1/queue") as api:
        assert api.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert api.headers["Cache-Control"] == "no-store"
    media_id = await upload_as(web, "admin", "listing-7", seed=3)
    async with web.client.get(
        f"{web.url}/api/v1/media/{media_id}/content", headers=bearer("admin")
    ) as content:
        assert content.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
        assert content.headers["X-Content-Type-Options"] == "nosniff"


async def test_without_a_tokens_file_browsers_need_the_csrf_token_and_loopback_names(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster))
    session = await web.ok("GET", "/api/v1/session")
    assert session["authentication"] is False
    browser = {"Origin": web.url, "Sec-Fetch-Site": "same-origin"}
    assert await refused(web, "POST", "/api/v1/queue:pause", headers=browser) == (
        403,
        "CSRF_TOKEN_INVALID",
    )
    with_token = {**browser, "X-CSRF-Token": session["csrfToken"]}
    assert (await web.ok("POST", "/api/v1/queue:resume", headers=with_token))["paused"] is False
    # A program (no browser's headers) calls as it would the gRPC port.
    assert (await web.ok("POST", "/api/v1/queue:resume"))["paused"] is False
    # DNS rebinding: another site's name resolving to 127.0.0.1 is not this origin.
    rebound = {"Host": f"attacker.example:{web.port}"}
    assert await refused(web, "GET", "/api/v1/queue", headers=rebound) == (
        403,
        "HOST_NOT_ALLOWED",
    )


async def test_tls_serves_https_and_marks_the_session_cookie_secure(
    secured: tuple[Cluster, Path], gateways: Gateways, tmp_path: Path
) -> None:
    cluster, path = secured
    pki = make_pki(tmp_path / "pki")
    trust = ssl.create_default_context(cafile=str(pki.ca))
    web = await gateways.start(
        web_config(
            cluster,
            tokens_file=path,
            service_token=TOKENS["service"],
            tls_files=ServiceTls(cert_file=pki.server.cert, key_file=pki.server.key),
        ),
        connector=aiohttp.TCPConnector(ssl=trust),
    )
    assert web.url.startswith("https://")
    async with web.client.post(
        f"{web.url}/api/v1/session", json={"token": TOKENS["viewer"]}
    ) as response:
        assert response.status == 200
        assert "Secure" in cookie_of(response)
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_beyond_loopback_the_gateway_needs_tokens_and_tls_or_insecure(tmp_path: Path) -> None:
    tokens = tokens_file(tmp_path)
    with pytest.raises(ValueError, match="without --tokens-file"):
        WebConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="without TLS"):
        WebConfig(host="0.0.0.0", tokens_file=tokens, service_token=TOKENS["service"])
    with pytest.raises(ValueError, match="service token"):
        WebConfig(tokens_file=tokens)
    assert WebConfig(host="0.0.0.0", insecure=True).insecure
