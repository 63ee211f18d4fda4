"""The web gateway's JSON API over both services: the protos' shapes in JSON, errors as
``google.rpc.Status`` JSON under the gRPC -> HTTP mapping, content with its ETag."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from analysis_service.config import WatchConfig
from tests.conftest import Cluster, wait_until
from tests.media_samples import mp4_bytes, png_bytes, truncated_jpeg_bytes
from tests.test_watch_scale import fast_cluster
from tests.web_support import Gateways, Web, form, web_config


@pytest.fixture
async def gateways() -> AsyncIterator[Gateways]:
    started = Gateways()
    yield started
    await started.close()


@pytest.fixture
async def web(make_cluster: Callable[..., Cluster], gateways: Gateways) -> Web:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    return await gateways.start(web_config(cluster))


def error_info(answer: dict[str, Any]) -> dict[str, Any]:
    """The ErrorInfo of a ``google.rpc.Status`` in JSON."""
    infos: list[dict[str, Any]] = [
        d for d in answer["details"] if d["@type"].endswith("google.rpc.ErrorInfo")
    ]
    (info,) = infos
    return info


def violated_fields(answer: dict[str, Any]) -> list[str]:
    return [
        violation["field"]
        for detail in answer["details"]
        if detail["@type"].endswith("google.rpc.BadRequest")
        for violation in detail["fieldViolations"]
    ]


async def test_upload_list_get_and_content_as_json(web: Web) -> None:
    # Larger than one chunk of ReadMediaContent.
    image = png_bytes(seed=1, size=(640, 480))
    assert len(image) > 256 * 1024
    answer = await web.ok(
        "POST",
        "/api/v1/media",
        data=form(
            {"owner_id": "listing-1", "category": "Hair", "context": ["city=Oslo"]},
            [("a.png", image, "image/png"), ("clip.mp4", mp4_bytes(), "video/mp4")],
        ),
    )
    assert answer["count"] == 2
    assert answer["message"] == (
        "Uploaded 2 media file(s). 1 image(s) are being analyzed in the background."
    )
    first, video = answer["media"]
    assert first["status"] == "PROCESSING_STATUS_PENDING"
    assert first["context"] == {"city": "Oslo"}
    assert video["status"] == "PROCESSING_STATUS_NOT_APPLICABLE"

    async def completed() -> bool:
        got = await web.ok("GET", f"/api/v1/media/{first['id']}")
        return bool(got["media"]["status"] == "PROCESSING_STATUS_COMPLETED")

    await wait_until(completed)
    listed = await web.ok(
        "GET", "/api/v1/media?owner_id=listing-1&status=PROCESSING_STATUS_COMPLETED"
    )
    assert [m["id"] for m in listed["media"]] == [first["id"]]
    assert listed["media"][0]["tags"]

    job = await web.ok("GET", f"/api/v1/jobs/{first['id']}")
    assert job["job"]["attempts"][0]["outcome"] == "COMPLETED"

    url = f"{web.url}/api/v1/media/{first['id']}/content"
    async with web.client.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        etag = response.headers["ETag"]
        assert etag == f'"{hashlib.sha256(image).hexdigest()}"'
        assert await response.read() == image
    async with web.client.get(url, headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert await response.read() == b""


async def test_refusals_are_status_json_with_their_http_status(web: Web) -> None:
    status, answer = await web.json(
        "POST",
        "/api/v1/media",
        data=form(
            {"owner_id": "listing-1"},
            [("ok.png", png_bytes(seed=2), "image/png"), ("bad.jpg", truncated_jpeg_bytes(3), "")],
        ),
    )
    assert status == 400
    assert answer["code"] == 3
    assert error_info(answer)["reason"] == "CORRUPT_IMAGE"
    assert error_info(answer)["domain"] == "mediatag"
    assert violated_fields(answer) == ["files[1].content"]
    # The batch was refused whole: nothing of it is listed.
    listed = await web.ok("GET", "/api/v1/media?owner_id=listing-1")
    assert listed["media"] == []

    status, answer = await web.json("GET", "/api/v1/media/no-such-id")
    assert (status, error_info(answer)["reason"]) == (404, "MEDIA_NOT_FOUND")

    status, answer = await web.json("GET", "/api/v1/media?colour=red")
    assert (status, error_info(answer)["reason"]) == (400, "UNKNOWN_PARAMETER")
    assert violated_fields(answer) == ["colour"]

    status, answer = await web.json("GET", "/api/v1/nothing-here")
    assert (status, answer["code"]) == (404, 5)
