"""The ``google`` analyser: Cloud Vision tags, a Vertex AI multimodal embedding, Gemini refinement.

One job makes, in order and each under its own API's rate limiter:

1. ``vision``: Cloud Vision ``BatchAnnotateImages`` with label detection, object localisation,
   image properties and safe search -> tags (see ``google_tags``);
2. ``embeddings``: Vertex AI ``Predict`` on ``multimodalembedding@001`` -> the embedding
   (``dimension`` 128, 256, 512 or 1408), L2-normalised;
3. ``gemini`` (only with ``refine_tags``): Vertex AI ``GenerateContent`` with the image, Vision's
   labels and objects, the category and the context, answering JSON -> refined tags merged in
   front of Vision's. An answer that is not the JSON asked for keeps Vision's tags.

Images are sent as uploaded when the API takes them; larger ones (20 MB, 75 megapixels) and
formats an API does not read are downscaled/re-encoded first (``google_images``), before the
call's rate-limit slot, so that the call follows its slot at once.

What Vision and the embeddings answered for a content is kept in this process until its
analysis completes (see ``_PartialResults``): a job put off by a later API's quota refusal, or
retried after a transient error, does not call them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis_service.analyzers.base import AnalysisInput, AnalysisOutput, ApiLimit, RateLimiter
from analysis_service.analyzers.google_clients import EMBEDDINGS, GEMINI, VISION, GoogleClients
from analysis_service.analyzers.google_images import (
    EMBEDDING_TYPES,
    GEMINI_TYPES,
    VISION_TYPES,
    ImageLimits,
    UploadImage,
    fit,
    fits,
    open_upload,
)
from analysis_service.analyzers.google_tags import (
    VisionFindings,
    merge,
    parse_refined,
    refine_prompt,
    vision_tags,
)
from analysis_service.config import GoogleConfig

logger = logging.getLogger(__name__)

# The seed's pace: at most 2 analyser calls per second, each API on its own.
SEED_RATE = 2.0
# Google's documented default quotas, per project, in requests per second: Vision 1,800/min;
# multimodal embeddings 120/min (600/min in some regions). Gemini on Vertex AI has no fixed
# per-project default (dynamic shared quota), so the seed's rate applies.
VISION_QUOTA = 1800 / 60
EMBEDDINGS_QUOTA = 120 / 60
# How long the partial results of an unfinished analysis are kept unused: the longest quota
# pause, so that a job put off by one finds them when it comes back.
PARTIAL_RESULTS_SECONDS = 3600.0
# The most contents whose partial results are kept: each is at most an embedding (5.6 kB at
# 1408 dimensions) and Vision's findings (a few kB), some 10 MB in all.
PARTIAL_RESULTS_ENTRIES = 1024


@dataclass
class _Partial:
    """What Vision and the embeddings answered for one content so far."""

    expires: float = 0.0
    findings: VisionFindings | None = None
    embedding: npt.NDArray[np.float32] | None = None


class _PartialResults:
    """The partial results of this process's unfinished analyses, by the content's SHA-256.

    Everything else they depend on (models, embedding dimension, image limits, Vision's
    features) is the analyser's configuration, fixed for its life. An entry is dropped when
    its analysis completes, when unused for ``seconds``, or as the least recently used beyond
    ``max_entries``. A retry on another replica finds none and calls the APIs again.
    """

    def __init__(self, seconds: float, max_entries: int) -> None:
        self._seconds = seconds
        self._max_entries = max_entries
        # Least recently used first: their expiries are in order.
        self._entries: OrderedDict[str, _Partial] = OrderedDict()

    def get(self, sha256: str) -> _Partial:
        """The content's partial results, or an empty entry (kept once something is added)."""
        now = time.monotonic()
        while self._entries and next(iter(self._entries.values())).expires <= now:
            self._entries.popitem(last=False)
        partial = self._entries.get(sha256)
        if partial is None:
            return _Partial()
        self.keep(sha256, partial)
        return partial

    def keep(self, sha256: str, partial: _Partial) -> None:
        """Keep ``partial`` as the content's, now its most recently used entry."""
        partial.expires = time.monotonic() + self._seconds
        self._entries[sha256] = partial
        self._entries.move_to_end(sha256)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, sha256: str) -> None:
        self._entries.pop(sha256, None)


class GoogleAnalyzer:
    """Tags and embeds images with Google Cloud; see the module docstring."""

    name = "google"
    version = "1.0"

    def __init__(self, config: GoogleConfig, *, embedding_dimensions: int = 1408) -> None:
        config.check(embedding_dimensions)
        self._config = config
        self._dimensions = embedding_dimensions
        self._limits = ImageLimits(config.max_image_bytes, config.max_image_pixels)
        self._clients = GoogleClients(config, embedding_dimensions)
        self._partial_results = _PartialResults(PARTIAL_RESULTS_SECONDS, PARTIAL_RESULTS_ENTRIES)

    @property
    def api_limits(self) -> Sequence[ApiLimit]:
        limits = [
            ApiLimit(VISION, min(VISION_QUOTA, SEED_RATE)),
            ApiLimit(EMBEDDINGS, min(EMBEDDINGS_QUOTA, SEED_RATE)),
        ]
        if self._config.refine_tags:
            limits.append(ApiLimit(GEMINI, SEED_RATE))
        return tuple(limits)

    def cache_inputs(self, category: str, context: Mapping[str, str]) -> Mapping[str, str]:
        config = self._config
        inputs = {
            "embedding_model": config.embedding_model,
            "dimensions": str(self._dimensions),
            "min_score": repr(config.min_score),
            "max_labels": str(config.max_labels),
            "max_objects": str(config.max_objects),
            "max_tags": str(config.max_tags),
            "max_image": f"{config.max_image_bytes}:{config.max_image_pixels}",
        }
        if config.refine_tags:
            # Only Gemini reads the category and the context.
            inputs["gemini_model"] = config.gemini_model
            inputs["category"] = category
            inputs["context"] = json.dumps(
                dict(sorted(context.items())), separators=(",", ":"), ensure_ascii=False
            )
        return inputs

    async def analyze(self, item: AnalysisInput, limiter: RateLimiter) -> AnalysisOutput:
        # Each request is made ready (an image re-encoded) before its slot: see the module.
        partial = self._partial_results.get(item.sha256)
        upload = await asyncio.to_thread(open_upload, item.content, item.content_type)
        image = await self._fit(upload, VISION_TYPES)
        findings = partial.findings
        if findings is None:
            await limiter.acquire(VISION)
            findings = partial.findings = await self._clients.annotate(image)
            self._partial_results.keep(item.sha256, partial)
        tags = vision_tags(findings, self._config.min_score)

        embedding = partial.embedding
        if embedding is None:
            embedding_image = await self._fit(image, EMBEDDING_TYPES)
            await limiter.acquire(EMBEDDINGS)
            embedding = partial.embedding = await self._clients.embed(embedding_image)
            self._partial_results.keep(item.sha256, partial)

        refined: list[str] | None = None
        if self._config.refine_tags:
            prompt = refine_prompt(findings, item.category, item.context, self._config.max_tags)
            gemini_image = await self._fit(image, GEMINI_TYPES)
            await limiter.acquire(GEMINI)
            answer = await self._clients.refine(gemini_image, prompt)
            if answer is not None:
                refined = parse_refined(answer)
            if refined is None:
                logger.warning(
                    "media %s: no refined tags from Gemini; Vision's tags only",
                    item.media_id,
                    extra={"media_id": item.media_id},
                )
                # Not cached; the next job with this content asks Gemini again, and only it.
                return AnalysisOutput(
                    merge(None, tags, self._config.max_tags), embedding, degraded=True
                )
        self._partial_results.forget(item.sha256)
        return AnalysisOutput(merge(refined, tags, self._config.max_tags), embedding)

    async def _fit(self, image: UploadImage, accepted: frozenset[str]) -> UploadImage:
        if fits(image, accepted, self._limits):
            return image
        # Decoding and re-encoding a large image takes a while: off the event loop.
        return await asyncio.to_thread(fit, image, accepted, self._limits)

    async def aclose(self) -> None:
        """Close the connections to Google."""
        await self._clients.aclose()
