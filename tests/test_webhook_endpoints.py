"""The webhooks file: every refusal names the entry and field (never the secret or the URL), a
refused file stops the service from starting, and a refused reload keeps the endpoints in use."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from ingest_service.config import IngestConfig, WebhookConfig
from ingest_service.domain.models import ProcessingStatus
from ingest_service.domain.webhook_endpoints import (
    MAX_FILE_BYTES,
    WebhookEndpoints,
    WebhooksFileError,
    parse_endpoints,
)
from ingest_service.server import create_server
from tests.conftest import wait_until

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def entry(name: str = "billing", url: str = "https://billing.example/h?key=k1", **more: str) -> str:
    fields = {"name": f'"{name}"', "url": f'"{url}"', "secret": f'"{SECRET}"', **more}
    return "[[endpoints]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items())


def test_a_file_with_every_field_is_read() -> None:
    [endpoint] = parse_endpoints(
        entry(owners='["listing-7"]', statuses='["FAILED"]'), max_endpoints=4
    )
    assert endpoint.wants("listing-7", ProcessingStatus.FAILED)
    assert not endpoint.wants("listing-7", ProcessingStatus.COMPLETED)
    assert not endpoint.wants("listing-8", ProcessingStatus.FAILED)
    assert SECRET not in repr(endpoint)
    assert "key=k1" not in repr(endpoint)
    [every] = parse_endpoints(entry(), max_endpoints=4)
    assert every.wants("anyone", ProcessingStatus.COMPLETED)
    assert parse_endpoints("", max_endpoints=4) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (entry(url="ftp://billing.example/h"), r"endpoints\[0\] \(billing\): url must be http"),
        (entry(url="https:///h"), "url names no host"),
        (entry(url="https://user:pw@billing.example/h"), "user name or password"),
        (entry(url="https://billing.example:99999/h"), "url is malformed"),
        (entry(url="https://billing.example/a b"), "spaces or control characters"),
        (entry(url="https://billing.example/h#frag"), "fragment"),
        (entry(secret='"not-a-whsec"'), "secret must be a string starting with whsec_"),
        (entry(secret='"whsec_!!!"'), "secret is not base64"),
        (entry(secret='"whsec_c2hvcnQ="'), "secret must encode 24 to 64 bytes"),
        (entry(name="Billing"), r"endpoints\[0\]: name must be"),
        (entry(statuses='["PENDING"]'), "status 'PENDING' is not one of COMPLETED, FAILED"),
        (entry(owners="[]"), "owners must be a non-empty list"),
        (entry(owners="[1]"), "owners must be a non-empty list"),
        (entry(colour='"red"'), "unknown field 'colour'"),
        (entry() + entry(), "endpoint name 'billing' appears twice"),
        ("[server]\nport = 1\n", "unknown table 'server'"),
        ("endpoints = 3\n", "array of tables"),
        ("[[endpoints]\n", "not TOML"),
        ("".join(entry(f"e{n}") for n in range(5)), "5 endpoints, more than the 4 allowed"),
    ],
)
def test_a_file_that_cannot_be_used_is_refused(text: str, message: str) -> None:
    with pytest.raises(WebhooksFileError, match=message) as refused:
        parse_endpoints(text, max_endpoints=4)
    assert SECRET not in str(refused.value)
    assert "key=k1" not in str(refused.value)


def test_a_file_too_large_or_missing_is_refused(tmp_path: Path) -> None:
    endpoints = WebhookEndpoints(tmp_path / "absent.toml", max_endpoints=4, reload_interval=1)
    with pytest.raises(WebhooksFileError, match=r"absent\.toml"):
        endpoints.load()
    large = tmp_path / "large.toml"
    large.write_text("#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(WebhooksFileError, match="larger than"):
        WebhookEndpoints(large, max_endpoints=4, reload_interval=1).load()


async def test_the_service_does_not_start_with_a_refused_file(tmp_path: Path) -> None:
    file = tmp_path / "hooks.toml"
    file.write_text(entry(url="gopher://billing.example/"))
    config = IngestConfig(port=0, data_dir=tmp_path / "ingest", webhooks=WebhookConfig(file=file))
    with pytest.raises(WebhooksFileError, match="url must be http"):
        await create_server(config)


async def test_a_changed_file_is_reloaded_and_a_refused_one_keeps_the_endpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "hooks.toml"
    file.write_text(entry("first"))
    endpoints = WebhookEndpoints(file, max_endpoints=4, reload_interval=0.02)
    changes = asyncio.Queue[list[str]]()
    endpoints.on_change = lambda: changes.put_nowait(sorted(endpoints.current))
    endpoints.load()
    endpoints.start()
    try:
        file.write_text(entry("first") + entry("second"))
        assert await asyncio.wait_for(changes.get(), 60) == ["first", "second"]

        file.write_text(entry("first") + entry("first"))

        async def refused() -> bool:
            return any("appears twice" in r.getMessage() for r in caplog.records)

        await wait_until(refused)
        assert sorted(endpoints.current) == ["first", "second"]
        assert changes.empty()

        file.write_text(entry("third"))
        assert await asyncio.wait_for(changes.get(), 60) == ["third"]
    finally:
        await endpoints.stop()
