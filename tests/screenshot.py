"""``make screenshot``: the dashboard with work going through it, as a PNG for the README.

Both services and the gateway run in this process (temporary data, free ports), a batch of
photos and an undecodable image are uploaded through the page, and Chromium takes the
picture once some have completed, one failed (its webhook to an alerting receiver that
answers 503 is dead, so the panel of dead deliveries shows) and the rest still wait.

    python -m tests.screenshot docs/dashboard.png
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from playwright.async_api import expect

from analysis_service.config import AnalysisConfig, RateLimitConfig, RetryPolicy
from ingest_service.config import IngestConfig
from tests.browser_support import Chromium
from tests.conftest import Cluster
from tests.media_samples import jpeg_bytes
from tests.test_web_browser import file, undecodable_png
from tests.test_webhook_retry import dying_webhooks
from tests.test_webhooks import Receiver, endpoints_file
from tests.web_support import Gateways, web_config

OWNER = "listing-42"
PHOTOS = 30


async def shoot(out: Path, chromium: Chromium) -> None:
    with tempfile.TemporaryDirectory(prefix="mediatag-screenshot-") as root:
        receiver = Receiver(script={"alerts": [503]})
        await receiver.start()
        hooks = endpoints_file(Path(root) / "webhooks.toml", {"crm": receiver.url("crm")})
        # The alerting endpoint takes failures only: one dead delivery, not one per photo.
        endpoints_file(
            Path(root) / "alerts.toml", {"alerts": receiver.url("alerts")}, 'statuses = ["FAILED"]'
        )
        hooks.write_text(hooks.read_text() + (Path(root) / "alerts.toml").read_text())
        cluster = Cluster(
            Path(root),
            analysis_config=AnalysisConfig(
                # Slow enough that the queue is still busy in the picture.
                rate_limits={"local": RateLimitConfig(3, 1)},
                retry=RetryPolicy(backoff_base=0.5),
                analyzer_processes=1,
            ),
            ingest_config=IngestConfig(webhooks=dying_webhooks(hooks)),
        )
        gateways = Gateways()
        try:
            await cluster.start_analysis()
            await cluster.start_ingest()
            web = await gateways.start(web_config(cluster))
            async with chromium.context(height=1500) as context:
                page = await context.new_page()
                await page.goto(web.url)
                await page.fill("#owner", OWNER)
                await page.click("#filters button[type=submit]")
                await expect(page.locator("#connection")).to_have_text("live")
                await page.fill("#category", "Hair")
                files = [
                    file(f"salon-{n:02d}.jpg", jpeg_bytes(seed=n, size=(480, 360)))
                    for n in range(PHOTOS)
                ]
                files[3:3] = [file("scan.png", undecodable_png(3), "image/png")]
                await page.set_input_files("#files", files)
                completed = page.locator("#items .status", has_text="completed")
                await expect(completed.nth(PHOTOS // 4)).to_be_visible()
                await expect(page.locator("#items .status", has_text="failed")).to_have_count(1)
                await expect(page.locator("#deliveries tbody tr")).to_have_count(1)
                # One more refresh of the counts and the chart.
                await page.wait_for_timeout(5500)
                await page.screenshot(path=str(out))
        finally:
            await gateways.close()
            await cluster.close()
            await receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="where to write the PNG")
    args = parser.parse_args()
    chromium = Chromium()
    try:
        asyncio.run(shoot(args.out, chromium))
    finally:
        chromium.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
