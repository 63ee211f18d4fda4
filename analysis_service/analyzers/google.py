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
formats an API does not read are downscaled/re-encoded first (``google_images``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence

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
from analysis_service.analyzers.google_tags import merge, parse_refined, refine_prompt, vision_tags
from analysis_service.config import GoogleConfig

logger = logging.getLogger(__name__)

# The seed's pace: at most 2 analyser calls per second, each API on its own.
SEED_RATE = 2.0
# Google's documented default quotas, per project, in requests per second: Vision 1,800/min;
# multimodal embeddings 120/min (600/min in some regions). Gemini on Vertex AI has no fixed
# per-project default (dynamic shared quota), so the seed's rate applies.
VISION_QUOTA = 1800 / 60
EMBEDDINGS_QUOTA = 120 / 60


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
        upload = await asyncio.to_thread(open_upload, item.content, item.content_type)
        image = await self._fit(upload, VISION_TYPES)
        await limiter.acquire(VISION)
        findings = await self._clients.annotate(image)
        tags = vision_tags(findings, self._config.min_score)

        await limiter.acquire(EMBEDDINGS)
        embedding = await self._clients.embed(await self._fit(image, EMBEDDING_TYPES))

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
        return AnalysisOutput(merge(refined, tags, self._config.max_tags), embedding)

    async def _fit(self, image: UploadImage, accepted: frozenset[str]) -> UploadImage:
        if fits(image, accepted, self._limits):
            return image
        # Decoding and re-encoding a large image takes a while: off the event loop.
        return await asyncio.to_thread(fit, image, accepted, self._limits)

    async def aclose(self) -> None:
        """Close the connections to Google."""
        await self._clients.aclose()
