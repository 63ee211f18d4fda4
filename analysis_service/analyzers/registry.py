"""Choosing the analyser by configuration."""

from __future__ import annotations

from analysis_service.analyzers.base import Analyzer
from analysis_service.config import ANALYZERS, AnalysisConfig


def build_analyzer(config: AnalysisConfig) -> Analyzer:
    """The analyser named by ``config.analyzer``.

    ``ValueError`` for an analyser it does not know (the config refuses settings a known one
    cannot use); ``RuntimeError`` when what it needs is missing (the ``google`` extra, Google
    credentials).
    """
    if config.analyzer == "local":
        from analysis_service.analyzers.local import LocalAnalyzer

        return LocalAnalyzer(
            embedding_dimensions=config.embedding_dimensions,
            processes=config.analyzer_processes,
        )
    if config.analyzer == "google":
        try:
            # Imported here: the Google client libraries are the optional `google` extra.
            from analysis_service.analyzers.google import GoogleAnalyzer
        except ImportError as exc:
            raise RuntimeError(
                "the google analyser needs the `google` extra: pip install 'mediatag[google]' "
                f"({exc})"
            ) from exc
        return GoogleAnalyzer(config.google, embedding_dimensions=config.embedding_dimensions)
    raise ValueError(f"unknown analyzer {config.analyzer!r}; choose one of {', '.join(ANALYZERS)}")


async def close_analyzer(analyzer: Analyzer) -> None:
    """Release what an analyser holds (connections), if it has an ``aclose``."""
    close = getattr(analyzer, "aclose", None)
    if close is not None:
        await close()
