"""The dashboard in a real browser (Debian's Chromium, driven by Playwright): uploads going
through live, a failure and its retry, pause, a viewer's page, untrusted names as text, a dead
webhook delivery and its retry, a reset of its event stream."""

from __future__ import annotations

import itertools
import json
import logging
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb
from playwright.async_api import FilePayload, Locator, Page, Request, Route, expect

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from ingest_service.config import IngestConfig
from tests.browser_support import Chromium
from tests.conftest import Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes, png_bytes
from tests.test_auth import TOKENS, tokens_file
from tests.test_pipeline import upload as upload_for
from tests.test_pipeline import wait_terminal
from tests.test_watch_scale import small_images
from tests.test_web_events import current_revision, log_compacted_past
from tests.test_webhook_retry import dying_webhooks
from tests.test_webhooks import Receiver, endpoints_file, stored_deliveries, upload, verified
from tests.web_support import Gateways, Web, web_config

OWNER = "listing-3"


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    browser = Chromium()
    yield browser
    browser.close()


def fast(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64),
        analysis_config=AnalysisConfig(
            embedding_dimensions=64,
            rate_limits={"local": RateLimitConfig(100, 10)},
            watch=WatchConfig(bookmark_interval=0.5),
        ),
    )


@pytest.fixture
async def web(
    make_cluster: Callable[..., Cluster], gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> Web:
    # A page waiting in vain shows only its last state; the services' timeline (INFO, timed,
    # printed when a test fails) tells where a change stopped on its way to it.
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="web_gateway")
    cluster = fast(make_cluster)
    await cluster.start_analysis()
    await cluster.start_ingest()
    return await gateways.start(web_config(cluster))


@pytest.fixture
async def page(chromium: Chromium) -> AsyncIterator[Page]:
    async with chromium.context() as context:
        yield await context.new_page()


def undecodable_png(seed: int) -> bytes:
    """A PNG whose structure is sound (chunk CRCs, IEND) but whose pixels do not inflate:
    ingest takes it, analysis cannot decode it."""
    png = png_bytes(seed)
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    garbage = bytes((n * 37 + 11) % 256 for n in range(length))
    chunk = struct.pack(">I", length) + b"IDAT" + garbage
    chunk += struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    return png[:start] + chunk + png[start + 12 + length :]


def file(name: str, content: bytes, mime: str = "image/jpeg") -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": content}


async def show_owner(page: Page, web: Web, owner: str = OWNER) -> None:
    await page.goto(web.url)
    await page.fill("#owner", owner)
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#connection")).to_have_text("live")


def row(page: Page, filename: str) -> Locator:
    return page.locator("#items tbody tr", has_text=filename)


async def test_two_uploads_reach_completed_in_the_list_without_a_reload(
    web: Web, page: Page
) -> None:
    await show_owner(page, web)
    await page.evaluate("window.notReloaded = true")
    await page.set_input_files(
        "#files", [file("first.jpg", jpeg_bytes(1)), file("second.jpg", jpeg_bytes(2))]
    )
    for name in ("first.jpg", "second.jpg"):
        line = page.locator("#items tbody tr", has_text=name)
        await expect(line.locator(".status")).to_have_text("completed")
        await expect(line.locator(".detail")).not_to_be_empty()
        await expect(page.locator("#uploads li", has_text=name).locator(".status")).to_have_text(
            "completed"
        )
    assert await page.evaluate("window.notReloaded") is True
    # Opened afresh with no owner chosen, the page lists every owner's most recent items.
    await page.goto(web.url)
    for name in ("first.jpg", "second.jpg"):
        await expect(
            page.locator("#items tbody tr", has_text=name).locator(".status")
        ).to_have_text("completed")


async def test_an_undecodable_image_shows_its_reason_and_retry_sends_it_back(
    web: Web, page: Page
) -> None:
    await show_owner(page, web)
    await page.set_input_files("#files", [file("broken.png", undecodable_png(5), "image/png")])
    line = page.locator("#items tbody tr", has_text="broken.png")
    await expect(line.locator(".status")).to_have_text("failed")
    await expect(line.locator(".detail")).to_contain_text("IMAGE_UNDECODABLE")
    # Its page has every attempt, with the reason.
    await line.locator("a").click()
    attempt = page.locator("#attempts tbody tr")
    await expect(attempt).to_have_count(1)
    await expect(attempt.locator("td").nth(3)).to_have_text("FAILED")
    await expect(attempt.locator("td").nth(4)).to_have_text("IMAGE_UNDECODABLE")
    await expect(page.locator("#item-retry")).to_be_visible()
    await page.go_back()
    # Paused, a job sent back stays pending where the page can see it.
    await page.click("#pause")
    await expect(page.locator("#paused")).to_have_text("paused")
    await line.locator("button.retry").click()
    await expect(line.locator(".status")).to_have_text("pending")
    await expect(line.locator("button.retry")).to_be_hidden()


async def test_pause_shows_paused_and_nothing_is_claimed_until_resume(
    make_cluster: Callable[..., Cluster], gateways: Gateways, page: Page
) -> None:
    cluster = fast(make_cluster)
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster))
    await show_owner(page, web)
    await page.click("#pause")
    await expect(page.locator("#paused")).to_have_text("paused")
    await expect(page.locator("#resume")).to_be_visible()
    await page.set_input_files("#files", [file("held.jpg", jpeg_bytes(9))])
    line = page.locator("#items tbody tr", has_text="held.jpg")
    await expect(line.locator(".status")).to_have_text("pending")
    media_id = await line.get_attribute("data-media-id")
    assert media_id

    async def queued() -> bool:
        found = await cluster.analysis.ListJobs(apb.ListJobsRequest())
        return any(job.media_id == media_id for job in found.jobs)

    # The job reached the queue, and the workers, woken by it, claimed nothing: the page
    # refreshes the counts every 2 s and shows it still waiting.
    await wait_until(queued)
    await expect(page.locator("#count-pending")).to_have_text("1")
    await expect(page.locator("#workers")).to_have_text("0 / 4")
    await expect(page.locator("#replicas tbody tr td").nth(2)).to_have_text("0 / 4")
    job = await cluster.analysis.GetJob(apb.GetJobRequest(media_id=media_id))
    assert job.job.status == apb.PROCESSING_STATUS_PENDING
    assert list(job.job.attempts) == []
    await page.click("#resume")
    await expect(line.locator(".status")).to_have_text("completed")


async def test_a_viewer_sees_no_actions_and_is_refused_if_it_calls_them(
    make_cluster: Callable[..., Cluster], gateways: Gateways, page: Page, tmp_path: Path
) -> None:
    path = tokens_file(tmp_path / "secrets")
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64),
        analysis_config=AnalysisConfig(
            embedding_dimensions=64, tokens_file=path, service_token=TOKENS["service"]
        ),
        ingest_config=IngestConfig(tokens_file=path, service_token=TOKENS["service"]),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(
        web_config(cluster, tokens_file=path, service_token=TOKENS["service"])
    )
    await page.goto(web.url)
    await expect(page.locator("#sign-in")).to_be_visible()
    await page.fill("#token", TOKENS["viewer"])
    await page.click("#sign-in-form button")
    await expect(page.locator("#who")).to_contain_text("dashboard (viewer)")
    await expect(page.locator("#paused")).to_have_text("running")
    for action in ("#pause", "#resume", "#retry-failed", "#drop"):
        await expect(page.locator(action)).to_be_hidden()

    refused = await page.evaluate(
        """async () => {
            const session = await (await fetch("/api/v1/session")).json();
            const answer = await fetch("/api/v1/queue:pause", {
                method: "POST", headers: {"X-CSRF-Token": session.csrfToken}});
            return [answer.status, (await answer.json()).details[0].reason];
        }"""
    )
    assert refused == [403, "ROLE_NOT_ALLOWED"]
    status = await web.ok(
        "GET", "/api/v1/queue", headers={"Authorization": f"Bearer {TOKENS['admin']}"}
    )
    assert status["paused"] is False


async def test_an_upload_answered_while_the_list_loads_shows_once(web: Web, page: Page) -> None:
    """The upload's answer shows its row first; the listing, held until then, holds the same
    item: still one row, which then changes as the item does."""
    await show_owner(page, web)
    listing_held: list[Route] = []

    async def hold_listing(route: Route) -> None:
        if listing_held:
            await route.continue_()  # a later listing (none is expected) is not held
        else:
            listing_held.append(route)

    await page.route(re.compile(r"/api/v1/media\?"), hold_listing)
    await page.click("#filters button[type=submit]")
    await wait_until(lambda: _true(bool(listing_held)))
    await page.set_input_files("#files", [file("raced.jpg", jpeg_bytes(5))])
    await expect(row(page, "raced.jpg")).to_have_count(1)
    await listing_held[0].continue_()

    await expect(page.locator("#connection")).to_have_text("live")
    await expect(row(page, "raced.jpg").locator(".status")).to_have_text("completed")
    await expect(row(page, "raced.jpg")).to_have_count(1)


async def _true(value: bool) -> bool:
    return value


async def test_a_filename_with_markup_shows_as_text(web: Web, page: Page) -> None:
    await show_owner(page, web)
    name = "<script>window.injected = 1</script><img src=x onerror=window.injected=2>.jpg"
    await page.set_input_files("#files", [file(name, jpeg_bytes(4))])
    line = page.locator("#items tbody tr", has_text="<script>")
    await expect(line.locator("a")).to_have_text(name)
    await expect(line.locator(".status")).to_have_text("completed")
    assert await page.evaluate("window.injected") is None
    assert await page.locator("#items script, #uploads script").count() == 0
    assert await page.locator("#items img[src=x]").count() == 0


async def test_a_dead_webhook_delivery_shows_and_its_retry_delivers_it(
    make_cluster: Callable[..., Cluster], gateways: Gateways, page: Page, tmp_path: Path
) -> None:
    receiver = Receiver(script={"hooks": [500]})
    await receiver.start()
    try:
        hooks = endpoints_file(tmp_path / "hooks.toml", {"hooks": receiver.url("hooks")})
        cluster = make_cluster(
            analyzer=ScriptedAnalyzer(dimensions=64),
            analysis_config=AnalysisConfig(
                embedding_dimensions=64, rate_limits={"local": RateLimitConfig(100, 10)}
            ),
            ingest_config=IngestConfig(webhooks=dying_webhooks(hooks)),
        )
        await cluster.start_analysis()
        await cluster.start_ingest()
        [media_id] = await upload(cluster, range(1))

        async def dead() -> bool:
            listed = await cluster.ingest.ListWebhookDeliveries(
                ipb.ListWebhookDeliveriesRequest(state=ipb.WEBHOOK_DELIVERY_STATE_DEAD)
            )
            return len(listed.deliveries) == 1

        await wait_until(dead)
        web = await gateways.start(web_config(cluster))
        await page.goto(web.url)
        line = page.locator("#deliveries tbody tr", has_text=media_id)
        cells = line.locator("td")
        await expect(cells.nth(0)).to_have_text("hooks")
        await expect(cells.nth(3)).to_have_text("completed")
        await expect(cells.nth(4)).to_have_text(re.compile(r"^[1-9][0-9]*$"))
        await expect(cells.nth(5)).to_have_text("HTTP 500")
        await expect(cells.nth(6)).not_to_be_empty()

        receiver.script["hooks"] = [200]
        refused_so_far = len(receiver.received["hooks"])
        await line.locator("button", has_text="Retry").click()
        await expect(page.locator("#notice")).to_have_text("1 webhook delivery(ies) sent again")
        await expect(page.locator("#dead-deliveries")).to_be_hidden()

        async def delivered() -> bool:
            return stored_deliveries(cluster) == 0

        await wait_until(delivered)
        [accepted] = receiver.received["hooks"][refused_so_far:]
        assert verified("hooks", accepted)["data"]["mediaId"] == media_id
    finally:
        await receiver.stop()


def start_revision(url: str) -> int:
    found = re.search(r"[?&]start_revision=([0-9]+)", url)
    return int(found.group(1)) if found else 0


async def test_an_owner_whose_last_change_was_compacted_reloads_once_and_stays_live(
    make_cluster: Callable[..., Cluster], gateways: Gateways, page: Page
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64),
        analysis_config=AnalysisConfig(
            embedding_dimensions=64,
            rate_limits={"local": RateLimitConfig(100, 10)},
            watch=WatchConfig(retention_events=3, compaction_interval=0.1),
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster))
    quiet = await upload_for(cluster, small_images(1, first_seed=1), owner="quiet")
    await wait_terminal(cluster, [m.id for m in quiet.media])
    busy = await upload_for(cluster, small_images(3, first_seed=10), owner="busy")
    await wait_terminal(cluster, [m.id for m in busy.media])
    listed = await web.ok("GET", "/api/v1/media?owner_id=quiet")
    (last_change,) = [int(media["statusRevision"]) for media in listed["media"]]
    await log_compacted_past(cluster, last_change)
    current = await current_revision(web)

    streams: list[str] = []

    def opened(request: Request) -> None:
        if "/api/v1/events" in request.url and "owner_id=quiet" in request.url:
            streams.append(request.url)

    page.on("request", opened)
    await show_owner(page, web, "quiet")

    # Its first stream, from its items' last change, is reset; the next, from the current
    # revision the reset gave, stays: a new item comes through it.
    async def reloaded() -> bool:
        return len(streams) >= 2

    await wait_until(reloaded)
    assert [start_revision(url) for url in streams[:2]] == [last_change, current]
    fresh = await upload_for(cluster, small_images(1, first_seed=20), owner="quiet")
    line = page.locator(f"#items tbody tr[data-media-id='{fresh.media[0].id}']")
    await expect(line.locator(".status")).to_have_text("completed")
    assert len(streams) == 2, streams


async def test_a_page_reset_again_and_again_reloads_less_and_less_often(
    web: Web, page: Page
) -> None:
    # Every event stream is answered with a reset (a gateway that cannot serve the
    # revision, however often asked).
    status = {
        "code": 11,
        "message": "revision 3 is compacted",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "REVISION_COMPACTED",
                "domain": "mediatag",
                "metadata": {"currentRevision": "77", "oldestRevision": "70"},
            }
        ],
    }
    asked: list[tuple[float, str]] = []

    async def reset(route: Route) -> None:
        asked.append((time.monotonic(), route.request.url))
        await route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=f"event: reset\ndata: {json.dumps(status)}\n\n",
        )

    await page.route(re.compile(r"/api/v1/events"), reset)
    await page.goto(web.url)

    async def reloaded_three_times() -> bool:
        return len(asked) >= 4

    await wait_until(reloaded_three_times)
    # The first reload at once, then after 1 s and 2 s (each jittered by up to half).
    times = [when for when, _ in asked]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[1] >= 0.5, gaps
    assert gaps[2] >= 1.0, gaps
    # Each from the revision the reset gave as current.
    assert [start_revision(url) for _, url in asked[1:4]] == [77, 77, 77]
