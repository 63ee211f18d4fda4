"""Tags of the ``google`` analyser: Vision's findings turned into tags, and Gemini's refinement.

Pure logic, no Google libraries: ``google_clients`` turns the wire messages into
:class:`VisionFindings` and Gemini's answer into text; this module decides the tags.

Tags are normalised (lower-case ASCII, words joined by hyphens, apostrophes dropped:
"Men's fade haircut" -> ``mens-fade-haircut``) and de-duplicated, first occurrence wins. Order:
Gemini's refined tags (when enabled and valid), then Vision's labels and objects at or above
the minimum score (highest first), then ``dominant-<colour>`` (the colour covering most of the
image, named with the palette both analysers share) and ``unsafe-<adult|violence|racy>`` when safe
search finds that likely.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis_service.analyzers.colours import COLOUR_NAMES, colour_names

logger = logging.getLogger(__name__)

MAX_TAG_LENGTH = 64
# Safe-search categories that become ``unsafe-<category>`` tags, and the likelihoods that count.
UNSAFE_CATEGORIES = ("adult", "violence", "racy")
UNSAFE_LIKELIHOODS = frozenset({"LIKELY", "VERY_LIKELY"})
# Far above any answer asked for (20 tags of at most 64 characters: under 2 KB).
MAX_REFINED_ANSWER_CHARS = 32_768
_NOT_WORD = re.compile(r"[^a-z0-9]+")
_APOSTROPHES = re.compile(r"['\u2019\u2018`]")


@dataclass(frozen=True)
class Scored:
    """A label or object Vision found, with its score (0..1)."""

    name: str
    score: float


@dataclass(frozen=True)
class Colour:
    """One of Vision's dominant colours: 0..255 components and the share of pixels it covers."""

    red: float
    green: float
    blue: float
    pixel_fraction: float


@dataclass(frozen=True)
class VisionFindings:
    """What Vision said about one image, independent of the wire format."""

    labels: Sequence[Scored] = ()
    objects: Sequence[Scored] = ()
    colours: Sequence[Colour] = ()
    # Safe-search category (adult, spoof, medical, violence, racy) -> likelihood name.
    safe_search: Mapping[str, str] = field(default_factory=dict)


def normalise(text: str) -> str:
    """``text`` as a tag: ASCII lower case, apostrophes dropped, other separators one hyphen."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    tag = _NOT_WORD.sub("-", _APOSTROPHES.sub("", ascii_text.lower())).strip("-")
    return tag[:MAX_TAG_LENGTH].rstrip("-")


def unique_tags(texts: Iterable[str]) -> list[str]:
    """Normalised, empty ones dropped, duplicates dropped (first occurrence wins)."""
    seen: dict[str, None] = {}
    for text in texts:
        tag = normalise(text)
        if tag:
            seen.setdefault(tag)
    return list(seen)


def vision_tags(findings: VisionFindings, min_score: float) -> list[str]:
    """Labels and objects at or above ``min_score`` (highest first), colour, safe search."""
    scored = [s for s in (*findings.labels, *findings.objects) if s.score >= min_score]
    scored.sort(key=lambda s: s.score, reverse=True)  # stable: labels first on ties
    texts = [s.name for s in scored]
    colour = dominant_colour(findings.colours)
    if colour is not None:
        texts.append(f"dominant-{colour}")
    texts.extend(
        f"unsafe-{category}"
        for category in UNSAFE_CATEGORIES
        if findings.safe_search.get(category) in UNSAFE_LIKELIHOODS
    )
    return unique_tags(texts)


def dominant_colour(colours: Sequence[Colour]) -> str | None:
    """The palette name of the colour covering the largest share of the image."""
    if not colours:
        return None
    top = max(colours, key=lambda c: c.pixel_fraction)
    planes = np.clip(np.array([[top.red], [top.green], [top.blue]], dtype=np.float64), 0, 255)
    return COLOUR_NAMES[int(colour_names(planes / 255.0)[0])]


def merge(refined: Sequence[str] | None, vision: Sequence[str], limit: int) -> tuple[str, ...]:
    """Gemini's refined tags first (more specific), then Vision's; at most ``limit``."""
    return tuple(unique_tags([*(refined or ()), *vision])[:limit])


# ---- Gemini ----

REFINE_INSTRUCTIONS = """\
You tag photos for a marketplace's search. Look at the image and refine the labels an image
classifier found into specific, searchable tags for the listing's category (for example, for
the category "Hair": "mens-fade-haircut", "textured-crop", "mid-fade" rather than "hair").
Use only what the image shows; do not guess brands, identities or prices.
Answer with JSON only: {"tags": ["tag", ...]}, at most %(max_tags)d tags, most specific first,
each lower-case words joined by hyphens."""


def refine_prompt(
    findings: VisionFindings, category: str, context: Mapping[str, str], max_tags: int
) -> str:
    """The text part of the Gemini request (the image goes with it)."""
    facts: dict[str, object] = {
        "category": category or "(none)",
        "context": dict(sorted(context.items())),
        "labels": [{"name": s.name, "score": round(s.score, 2)} for s in findings.labels],
        "objects": [{"name": s.name, "score": round(s.score, 2)} for s in findings.objects],
    }
    # Context comes from uploaders: it is data inside a JSON document, not instructions.
    return (
        REFINE_INSTRUCTIONS % {"max_tags": max_tags}
        + "\n\nWhat is known about the image (JSON):\n"
        + json.dumps(facts, ensure_ascii=False, indent=1)
    )


def parse_refined(text: str) -> list[str] | None:
    """Gemini's tags from its JSON answer; None (and a warning) for anything else."""
    if len(text) > MAX_REFINED_ANSWER_CHARS:
        # Refused before parsing, so a runaway answer costs no more than reading it.
        logger.warning(
            "Gemini's answer is %d characters long; keeping Vision's tags: %.200r", len(text), text
        )
        return None
    try:
        answer = json.loads(_strip_code_fence(text))
    except (ValueError, RecursionError):
        # RecursionError: arrays or objects nested deeper than the parser goes.
        logger.warning("Gemini's answer is not JSON; keeping Vision's tags: %.200r", text)
        return None
    tags = answer.get("tags") if isinstance(answer, dict) else answer
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        logger.warning("Gemini's answer has no list of tags; keeping Vision's tags: %.200r", text)
        return None
    return unique_tags(tags)


def _strip_code_fence(text: str) -> str:
    # JSON mode answers bare JSON, but a model may still wrap it in a Markdown fence.
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.removesuffix("```").strip()
    return stripped
