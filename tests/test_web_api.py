"""The web gateway's JSON API over both services: the protos' shapes in JSON, errors as
``google.rpc.Status`` JSON under the gRPC -> HTTP mapping, content with its ETag."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from analysis_service.config import WatchConfig
from tests.conftest import Cluster, wait_until
from tests.media_samples import mp4_bytes, png_bytes, truncated_jpeg_bytes
from tests.test_watch_scale import fast_cluster
from tests.web_support import Gateways, Web, form, slow_upload, web_config


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


async def test_one_file_too_large_to_hold_is_streamed_and_batches_are_bounded(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster, max_batch_upload_bytes=100_000))
    large = png_bytes(seed=6, size=(640, 480))
    small = png_bytes(seed=7, size=(64, 48))
    assert len(large) > 100_000 > len(small)

    answer = await web.ok(
        "POST", "/api/v1/media", data=form({"owner_id": "big"}, [("large.png", large, "")])
    )
    assert answer["count"] == 1
    assert answer["media"][0]["sizeBytes"] == str(len(large))
    assert answer["media"][0]["sha256"] == hashlib.sha256(large).hexdigest()

    for files, reason in (
        ([("a.png", small, ""), ("large.png", large, "")], "BATCH_TOO_LARGE"),
        ([("large.png", large, ""), ("a.png", small, "")], "LARGE_FILE_NOT_ALONE"),
    ):
        status, refused = await web.json(
            "POST", "/api/v1/media", data=form({"owner_id": "refused"}, files)
        )
        assert (status, error_info(refused)["reason"]) == (400, reason)
        assert violated_fields(refused) == ["files"]
    # Refused whole: nothing of either batch is stored, the streamed part neither.
    assert (await web.ok("GET", "/api/v1/media?owner_id=refused"))["media"] == []
    assert len((await web.ok("GET", "/api/v1/media?owner_id=big"))["media"]) == 1


async def test_malformed_requests_are_refused_naming_what_is_wrong(web: Web) -> None:
    cases: list[tuple[str, str, dict[str, Any], str, str]] = [
        ("GET", "/api/v1/media?owner_id=a&owner_id=b", {}, "REPEATED_PARAMETER", "owner_id"),
        ("GET", "/api/v1/media?owner_id=a&page_size=many", {}, "INVALID_REQUEST", "query"),
        ("POST", "/api/v1/media:reprocess", {"data": "mediaIds=x"}, "JSON_REQUIRED", "body"),
        (
            "POST",
            "/api/v1/media:reprocess",
            {"data": "[1]", "headers": {"Content-Type": "application/json"}},
            "INVALID_JSON",
            "body",
        ),
        ("POST", "/api/v1/media", {"json": {"ownerId": "a"}}, "MULTIPART_REQUIRED", "body"),
        (
            "POST",
            "/api/v1/media",
            {"data": form({"owner_id": "a", "context": "no-equals-sign"}, [("a.png", b"x", "")])},
            "INVALID_CONTEXT",
            "context",
        ),
        (
            "POST",
            "/api/v1/media",
            {"data": form({"owner_id": "a", "category": "x" * 70_000}, [("a.png", b"x", "")])},
            "FIELD_TOO_LARGE",
            "category",
        ),
        ("GET", "/api/v1/events?start_revision=-1", {}, "INVALID_REVISION", "start_revision"),
        (
            "GET",
            "/api/v1/events",
            {"headers": {"Last-Event-ID": "yesterday"}},
            "INVALID_REVISION",
            "Last-Event-ID",
        ),
        (
            "GET",
            "/api/v1/events?" + "&".join(f"media_ids={n}" for n in range(1001)),
            {},
            "TOO_MANY_MEDIA_IDS",
            "media_ids",
        ),
    ]
    for method, path, options, reason, field in cases:
        status, answer = await web.json(method, path, **options)
        assert (status, error_info(answer)["reason"], violated_fields(answer)) == (
            400,
            reason,
            [field],
        ), path
    # A field after the files.
    data = form({"owner_id": "a"}, [("a.png", png_bytes(seed=1), "image/png")])
    data.add_field("category", "late")
    status, answer = await web.json("POST", "/api/v1/media", data=data)
    assert (status, error_info(answer)["reason"]) == (400, "FIELD_AFTER_FILES")
    assert (await web.ok("GET", "/api/v1/media?owner_id=a"))["media"] == []


async def test_uploads_in_progress_are_bounded(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster, max_concurrent_uploads=1))
    image = png_bytes(seed=8)
    may_finish = asyncio.Event()
    slow = slow_upload(web, "slow", "slow.png", image, may_finish)

    async def in_progress() -> bool:
        return web.host.gateway.uploads_in_progress == 1

    await wait_until(in_progress)
    status, answer = await web.json(
        "POST", "/api/v1/media", data=form({"owner_id": "fast"}, [("f.png", image, "")])
    )
    assert (status, error_info(answer)["reason"]) == (429, "TOO_MANY_UPLOADS")
    assert error_info(answer)["metadata"] == {"maxUploads": "1"}
    may_finish.set()
    status, answer = await slow
    assert (status, answer["media"][0]["filename"]) == (200, "slow.png")
    assert (await web.ok("GET", "/api/v1/media?owner_id=fast"))["media"] == []
    assert web.host.gateway.uploads_in_progress == 0
