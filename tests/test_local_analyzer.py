"""The offline ``local`` analyser on generated images: tags, embedding, errors and decode cost."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import multiprocessing
import os
import re
import resource
import signal
import struct
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw, ImageFilter, JpegImagePlugin

from analysis_service.analyzers import local
from analysis_service.analyzers.base import AnalysisInput, AnalysisOutput, ApiLimit
from analysis_service.analyzers.local import LocalAnalyzer
from analysis_service.errors import PermanentAnalyzerError, TransientAnalyzerError
from tests.analysis_child import projections_made
from tests.conftest import PATIENCE, wait_until

TAG_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
SCENE_SEEDS = (11, 22, 33, 44, 55, 66)


class CountingLimiter:
    """Stands in for the rate limiter: lets every call through and counts them per API."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def acquire(self, api: str) -> None:
        self.calls[api] += 1


def scene(seed: int, size: tuple[int, int] = (640, 480), *, retake: int = 0) -> Image.Image:
    """A photo-like image: gradient sky, rippled ground, a few shapes and sensor noise.

    ``retake`` re-renders the same scene with the shapes moved a little, another exposure and
    fresh noise, like a second shot of the same subject.
    """
    layout = np.random.default_rng(seed)
    noise = np.random.default_rng([seed, retake])
    width, height = size
    top, bottom, ground = (layout.integers(0, 256, 3) for _ in range(3))
    horizon = int(height * layout.uniform(0.35, 0.75))
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = np.broadcast_to(top * (1 - rows) + bottom * rows, (height, width, 3)).copy()
    fx, fy, phase = layout.uniform(0.02, 0.15), layout.uniform(0.02, 0.15), layout.uniform(0, 6)
    ripple = np.sin(np.arange(width)[None, :] * fx + np.arange(height - horizon)[:, None] * fy)
    pixels[horizon:] = ground * (0.6 + 0.2 * (ripple[..., None] + np.sin(phase)))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    shift = 6 * retake
    for _ in range(int(layout.integers(3, 8))):
        colour = tuple(int(c) for c in layout.integers(0, 256, 3))
        x0 = int(layout.integers(0, width - 40)) + shift
        y0 = int(layout.integers(0, height - 40)) + shift // 2
        x1 = x0 + int(layout.integers(30, width // 2))
        y1 = y0 + int(layout.integers(30, height // 2))
        shape = int(layout.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    exposure = 1.0 + 0.05 * retake
    noisy = np.asarray(image, dtype=np.float64) * exposure + noise.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def detailed(seed: int) -> Image.Image:
    """A scene with fine texture (a grating of a few pixels' period), sharp at any working size."""
    base = np.asarray(scene(seed), dtype=np.float64)
    height, width, _ = base.shape
    grating = 40.0 * np.sin(np.arange(width)[None, :] * 1.3 + np.arange(height)[:, None] * 0.7)
    return Image.fromarray(np.clip(base + grating[..., None], 0, 255).astype(np.uint8))


def encode(image: Image.Image, image_format: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def near_duplicates(image: Image.Image) -> dict[str, bytes]:
    width, height = image.size
    dx, dy = round(width * 0.025), round(height * 0.025)
    return {
        "jpeg-q60": encode(image, "JPEG", quality=60),
        "resized-50%": encode(image.resize((width // 2, height // 2), Image.Resampling.LANCZOS)),
        "cropped-5%": encode(image.crop((dx, dy, width - dx, height - dy))),
        "png-to-jpeg": encode(Image.open(io.BytesIO(encode(image))).convert("RGB"), "JPEG"),
    }


async def analyse(
    content: bytes, analyzer: LocalAnalyzer | None = None, limiter: CountingLimiter | None = None
) -> AnalysisOutput:
    item = AnalysisInput(
        media_id="media-1",
        content=content,
        content_type="application/octet-stream",
        sha256=hashlib.sha256(content).hexdigest(),
    )
    return await (analyzer or LocalAnalyzer()).analyze(item, limiter or CountingLimiter())


async def tags_of(image: Image.Image, image_format: str = "PNG", **options: Any) -> tuple[str, ...]:
    return (await analyse(encode(image, image_format, **options))).tags


def cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)))


async def test_near_duplicates_score_higher_than_unrelated_images() -> None:
    embeddings: dict[tuple[int, str], npt.NDArray[np.float32]] = {}
    for seed in SCENE_SEEDS:
        original = scene(seed)
        embeddings[seed, "original"] = (await analyse(encode(original))).embedding
        for kind, content in near_duplicates(original).items():
            embeddings[seed, kind] = (await analyse(content)).embedding

    near = {
        key: cosine(embeddings[key[0], "original"], embedding)
        for key, embedding in embeddings.items()
        if key[1] != "original"
    }
    unrelated = {
        (a, b): cosine(embeddings[a], embeddings[b])
        for a, b in itertools.combinations(embeddings, 2)
        if a[0] != b[0]
    }
    weakest = min(near, key=near.__getitem__)
    closest = max(unrelated, key=unrelated.__getitem__)
    summary = (
        f"near-duplicate min {near[weakest]:.4f} ({weakest}), "
        f"unrelated max {unrelated[closest]:.4f} ({closest}), "
        f"unrelated mean {np.mean(list(unrelated.values())):.4f}"
    )
    print(summary)
    assert near[weakest] > unrelated[closest] + 0.3, summary


async def test_a_retake_of_a_scene_is_closer_than_other_scenes() -> None:
    originals = {seed: (await analyse(encode(scene(seed)))).embedding for seed in SCENE_SEEDS}
    for seed in SCENE_SEEDS:
        retake = (await analyse(encode(scene(seed, retake=1)))).embedding
        similar = cosine(originals[seed], retake)
        others = {other: cosine(originals[other], retake) for other in SCENE_SEEDS if other != seed}
        assert similar > max(others.values()) + 0.2, (seed, similar, others)


@pytest.mark.parametrize("dimensions", [64, 100, 1408])
async def test_embedding_is_unit_float32_of_the_configured_dimension(dimensions: int) -> None:
    content = encode(scene(SCENE_SEEDS[0]), "JPEG")
    first = await analyse(content, LocalAnalyzer(embedding_dimensions=dimensions))
    again = await analyse(content, LocalAnalyzer(embedding_dimensions=dimensions))

    assert first.embedding.shape == (dimensions,)
    assert first.embedding.dtype == np.float32
    assert float(np.linalg.norm(first.embedding)) == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(first.embedding, again.embedding)
    assert first.tags == again.tags


async def test_tags_are_lower_case_hyphenated_and_deterministic() -> None:
    for seed in SCENE_SEEDS:
        content = encode(scene(seed), "JPEG", quality=85)
        tags = (await analyse(content)).tags
        assert tags
        assert len(set(tags)) == len(tags), tags
        assert all(TAG_PATTERN.match(tag) for tag in tags), tags
        assert (await analyse(content)).tags == tags
        assert sum(tag.startswith("orientation-") for tag in tags) == 1
        assert sum(tag.startswith("size-") for tag in tags) == 1
        assert 1 <= sum(tag.startswith("dominant-") for tag in tags) <= 3


async def test_orientation_follows_the_displayed_shape() -> None:
    landscape = scene(SCENE_SEEDS[1])
    assert "orientation-landscape" in await tags_of(landscape)
    assert "orientation-portrait" in await tags_of(scene(SCENE_SEEDS[1], (480, 640)))
    assert "orientation-square" in await tags_of(scene(SCENE_SEEDS[1], (500, 500)))

    # Stored landscape, shown rotated 90 degrees by its EXIF orientation.
    exif = Image.Exif()
    exif[0x0112] = 6
    assert "orientation-portrait" in await tags_of(landscape, "JPEG", exif=exif)


@pytest.mark.parametrize(("mode", "image_format"), [("RGB", "JPEG"), ("RGBA", "PNG")])
async def test_the_pixels_are_measured_as_displayed_after_exif_orientation(
    mode: str, image_format: str
) -> None:
    # Larger than the working size, so the image is shrunk before it is turned.
    stored = scene(SCENE_SEEDS[2], (1200, 900)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    turned = (await analyse(encode(stored, image_format, exif=exif))).embedding
    displayed = await analyse(encode(stored.transpose(Image.Transpose.ROTATE_270), image_format))
    as_stored = (await analyse(encode(stored, image_format))).embedding

    assert cosine(turned, displayed.embedding) > 0.99
    assert cosine(turned, as_stored) < 0.9


async def test_a_mostly_blue_image_is_dominant_blue() -> None:
    rng = np.random.default_rng(7)
    rows = np.linspace(0.0, 1.0, 480)[:, None, None]
    sky = np.array([20, 60, 170]) * (1 - rows) + np.array([110, 170, 240]) * rows
    pixels = np.broadcast_to(sky, (480, 640, 3)) + rng.normal(0, 6, (480, 640, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((250, 180, 330, 260), fill=(250, 250, 245))

    tags = await tags_of(image, "JPEG")

    assert next(tag for tag in tags if tag.startswith("dominant-")) == "dominant-blue", tags


async def test_a_blurred_image_is_blurry_and_its_original_is_not() -> None:
    original = detailed(SCENE_SEEDS[2])
    blurred = original.filter(ImageFilter.GaussianBlur(6))

    original_tags = await tags_of(original, "JPEG", quality=90)
    blurred_tags = await tags_of(blurred, "JPEG", quality=90)

    assert "sharpness-sharp" in original_tags
    assert "sharpness-blurry" not in original_tags
    assert "sharpness-blurry" in blurred_tags


async def test_transparency_is_tagged_only_when_the_alpha_channel_is_used() -> None:
    opaque = scene(SCENE_SEEDS[3]).convert("RGBA")
    cut_out = opaque.copy()
    ImageDraw.Draw(cut_out).rectangle((0, 0, 320, 480), fill=(0, 0, 0, 0))

    assert "transparent" in await tags_of(cut_out)
    assert "transparent" not in await tags_of(opaque)


async def test_an_animated_gif_is_animated_and_a_still_one_is_not() -> None:
    frames = [scene(seed, (160, 120)).convert("P") for seed in SCENE_SEEDS[:3]]

    animated = await tags_of(frames[0], "GIF", save_all=True, append_images=frames[1:])
    still = await tags_of(frames[0], "GIF")

    assert "animated" in animated
    assert "animated" not in still


async def test_a_dark_image_is_dark() -> None:
    dark = Image.fromarray((np.asarray(scene(SCENE_SEEDS[4])) * 0.15).astype(np.uint8))
    tags = await tags_of(dark, "JPEG")
    assert "brightness-dark" in tags
    assert "brightness-dark" not in await tags_of(Image.new("RGB", (64, 64), (240, 240, 240)))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "CMYK", "I", "I;16", "RGBA", "YCbCr"])
async def test_every_common_mode_is_measured(mode: str) -> None:
    image = scene(SCENE_SEEDS[5], (200, 150))
    if mode == "I;16":
        # 16-bit samples near full scale: a bright image, not one clipped or read as 8-bit.
        converted = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 40 + 55000)
    elif mode == "I":
        converted = image.convert("L").convert("I")
    else:
        converted = image.convert(mode)
    image_format = {"CMYK": "JPEG", "YCbCr": "JPEG", "I": "TIFF"}.get(mode, "PNG")
    if mode == "PA":
        image_format = "TIFF"

    result = await analyse(encode(converted, image_format))

    assert all(TAG_PATTERN.match(tag) for tag in result.tags), result.tags
    assert float(np.linalg.norm(result.embedding)) == pytest.approx(1.0, abs=1e-5)
    if mode == "I;16":
        assert "brightness-bright" in result.tags


@pytest.mark.parametrize(
    "content",
    [
        b"not an image at all",
        encode(scene(SCENE_SEEDS[0]), "JPEG")[:5000],
        encode(scene(SCENE_SEEDS[0]), "PNG")[:5000],
    ],
    ids=["garbage", "truncated-jpeg", "truncated-png"],
)
async def test_undecodable_bytes_are_a_permanent_failure(content: bytes) -> None:
    with pytest.raises(PermanentAnalyzerError) as raised:
        await analyse(content)
    assert raised.value.reason == "IMAGE_UNDECODABLE"
    assert not raised.value.transient


def analyse_with_memory_to_spare(content: bytes, spare_bytes: int) -> str:
    """In a child process: analyse ``content`` with the address space limited to what the process
    uses now plus ``spare_bytes``; "measured", or the failure's reason."""
    local._analyze_bytes(local._warm_up_image(), 64)
    status = Path("/proc/self/status").read_text()
    in_use = int(re.search(r"VmSize:\s+(\d+) kB", status)[1]) * 1024  # type: ignore[index]
    resource.setrlimit(resource.RLIMIT_AS, (in_use + spare_bytes, resource.RLIM_INFINITY))
    try:
        local._analyze_bytes(content, 64)
    except PermanentAnalyzerError as exc:
        return exc.reason
    return "measured"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
async def test_a_large_image_is_measured_in_little_more_memory_than_its_decoded_size(
    mode: str,
) -> None:
    """Address space, not resident memory, is limited: a deterministic measure of what decoding
    allocates. Full-size copies (turned, converted) took three to six times the decoded size."""
    side = 6000
    image = Image.new(mode, (side, side), "teal" if mode != "P" else 3)
    ImageDraw.Draw(image).ellipse((1000, 1000, 5000, 5000), fill="orange" if mode != "P" else 9)
    content = encode(image, "PNG")
    del image
    # Pillow holds 4 bytes a pixel for RGB(A), 1 for P: half as much again to spare.
    decoded = side * side * (1 if mode == "P" else 4)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        outcome = await asyncio.get_running_loop().run_in_executor(
            pool, analyse_with_memory_to_spare, content, decoded * 3 // 2
        )
    finally:
        await asyncio.to_thread(local._kill_pool, pool)
    assert outcome == "measured"


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4))
    return b"\x89PNG\r\n\x1a\n" + chunks + chunk(b"IEND", b"")


async def test_a_decompression_bomb_is_too_large() -> None:
    with pytest.raises(PermanentAnalyzerError) as raised:
        await analyse(png_declaring(100_000, 100_000))
    assert raised.value.reason == "IMAGE_TOO_LARGE"


async def test_pillows_pixel_limit_stays_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(PermanentAnalyzerError) as raised:
        await analyse(encode(scene(SCENE_SEEDS[0], (100, 100))))
    assert raised.value.reason == "IMAGE_TOO_LARGE"


async def test_a_12_megapixel_jpeg_is_decoded_at_an_eighth_of_its_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libjpeg scales while it decodes: the 36 MiB a full decode of 4000 x 3000 takes are never
    made. (This used to compare CPU times with a full decode, whose own cost halves once the
    process's allocator holds memory from earlier tests: 48 against 90 ms, and CI failed it.)"""
    photo = scene(SCENE_SEEDS[1], (1000, 750)).resize((4000, 3000), Image.Resampling.BICUBIC)
    content = encode(photo, "JPEG", quality=85)
    decoded: list[tuple[int, int]] = []
    load = JpegImagePlugin.JpegImageFile.load

    def recording_load(image: JpegImagePlugin.JpegImageFile) -> Any:
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    result = await analyse(content, LocalAnalyzer())

    assert "size-very-large" in result.tags, "the size tags are of the image as uploaded"
    assert decoded, "the JPEG was not decoded by Pillow's JPEG plugin"
    assert max(decoded) <= (500, 375), decoded


async def test_one_limiter_slot_per_analysis_and_a_cache_key_without_category() -> None:
    analyzer = LocalAnalyzer(embedding_dimensions=256)
    limiter = CountingLimiter()
    content = encode(scene(SCENE_SEEDS[0], (120, 90)))

    await analyse(content, analyzer, limiter)

    assert limiter.calls == Counter({"local": 1})
    assert tuple(analyzer.api_limits) == (ApiLimit("local", rate_per_second=2.0, burst=1),)
    food = analyzer.cache_inputs("food", {})
    assert food == analyzer.cache_inputs("pets", {"caption": "a dog"}) == {"dimensions": "256"}
    assert LocalAnalyzer(embedding_dimensions=128).cache_inputs("food", {}) != food


async def test_analysis_processes_measure_exactly_what_threads_do() -> None:
    images = [encode(scene(seed), "JPEG") for seed in SCENE_SEEDS[:3]]
    in_process = [await analyse(content) for content in images]
    analyzer = LocalAnalyzer(processes=2)
    try:
        in_children = [await analyse(content, analyzer) for content in images]
        with pytest.raises(PermanentAnalyzerError) as raised:
            await analyse(b"not an image at all", analyzer)
    finally:
        await analyzer.aclose()
    for here, there in zip(in_process, in_children, strict=True):
        assert there.tags == here.tags
        np.testing.assert_array_equal(there.embedding, here.embedding)
    assert raised.value.reason == "IMAGE_UNDECODABLE"
    assert not raised.value.transient


async def test_an_analysis_process_is_ready_before_its_first_job() -> None:
    """The first analysis's one-time costs (the embedding's projection, the decoders) are
    paid by the process's start, at the service's priority, not by its first job at idle
    priority."""
    pool = ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=local._start_child,
        initargs=(os.getpid(), 64),
    )
    try:
        made = await asyncio.get_running_loop().run_in_executor(pool, projections_made)
    finally:
        await asyncio.to_thread(local._kill_pool, pool)
    assert made == 1


async def test_closing_stops_analysis_processes_that_get_no_cpu() -> None:
    """At idle priority, beside programs that keep every core busy, an analysis process
    gets next to no CPU: the service must still stop. A stopped process gets none at all."""
    content = encode(scene(SCENE_SEEDS[0]), "JPEG")
    analyzer = LocalAnalyzer(processes=2)
    try:
        await analyse(content, analyzer)
        children = multiprocessing.active_children()
        assert children
        for child in children:
            os.kill(child.pid or 0, signal.SIGSTOP)
    finally:
        await asyncio.wait_for(analyzer.aclose(), timeout=PATIENCE)
    assert not multiprocessing.active_children()


async def test_analysis_processes_run_at_lower_cpu_priority_and_a_dead_one_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    content = encode(scene(SCENE_SEEDS[0]), "JPEG")
    analyzer = LocalAnalyzer(processes=1)
    try:
        await analyse(content, analyzer)
        (child,) = multiprocessing.active_children()
        # Numeric libraries single-threaded in there (their busy-waiting threads would
        # compete with the other processes).
        environ = Path(f"/proc/{child.pid}/environ")
        environment = (await asyncio.to_thread(environ.read_bytes)).split(b"\0")
        assert b"OPENBLAS_NUM_THREADS=1" in environment
        assert os.getpriority(os.PRIO_PROCESS, child.pid or 0) > os.getpriority(os.PRIO_PROCESS, 0)
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(child.pid or 0) == os.SCHED_IDLE
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(timeout=10)
        # The call that finds the pool broken is measured again, alone (the dead process was
        # not measuring its image)...
        assert (await analyse(content, analyzer)).tags
        # ... and the next one runs in a new process.
        assert (await analyse(content, analyzer)).tags
    finally:
        await analyzer.aclose()
    assert not multiprocessing.active_children()


def resident_bytes(pid: int) -> int:
    """Resident memory of process ``pid``; 0 once it is gone."""
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def test_a_process_killed_by_one_image_fails_that_image_alone() -> None:
    """As the out-of-memory killer would, every analysis process holding more than its share of
    memory is killed: only the large image does that. The jobs queued beside it in the process
    pool are measured; the large image fails (an attempt), after one try alone, not endlessly."""
    innocents = [encode(scene(seed, (160, 120))) for seed in SCENE_SEEDS[:3]]
    expected = [await analyse(content) for content in innocents]
    poison_image = Image.new("RGB", (6000, 6000), "teal")
    ImageDraw.Draw(poison_image).ellipse((1000, 1000, 5000, 5000), fill="orange")
    poison = encode(poison_image, "PNG")
    del poison_image
    analyzer = LocalAnalyzer(processes=1)
    try:
        await analyse(innocents[0], analyzer)
        (child,) = multiprocessing.active_children()
        # 6000 x 6000 RGB is 137 MiB decoded; a small image adds next to nothing.
        limit = resident_bytes(child.pid or 0) + 64 * 2**20
        # One process: the small images wait in the pool behind the large one.
        poisoned = asyncio.create_task(analyse(poison, analyzer))
        measured = [asyncio.create_task(analyse(content, analyzer)) for content in innocents]
        killed: set[int] = set()

        async def kill_the_greedy() -> bool:
            for process in multiprocessing.active_children():
                if process.pid and resident_bytes(process.pid) > limit:
                    os.kill(process.pid, signal.SIGKILL)
                    killed.add(process.pid)
            return poisoned.done()

        await wait_until(kill_the_greedy, interval=0.005)
        results = await asyncio.wait_for(asyncio.gather(*measured), timeout=PATIENCE)
        with pytest.raises(TransientAnalyzerError):
            await poisoned
    finally:
        await analyzer.aclose()
    for there, here in zip(results, expected, strict=True):
        assert there.tags == here.tags
        np.testing.assert_array_equal(there.embedding, here.embedding)
    # Once in the pool with the others, once alone.
    assert len(killed) == 2

    async def all_ended() -> bool:
        # A process killed by close may take a moment to be gone on a loaded machine.
        return not multiprocessing.active_children()

    await wait_until(all_ended)
