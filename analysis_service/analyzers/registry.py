"""Choosing the analyser by configuration."""

from __future__ import annotations

from analysis_service.analyzers.base import Analyzer
from analysis_service.config import AnalysisConfig

ANALYZERS = ("local",)


def build_analyzer(config: AnalysisConfig) -> Analyzer:
    """The analyser named by ``config.analyzer``."""
    if config.analyzer == "local":
        from analysis_service.analyzers.local import LocalAnalyzer

        return LocalAnalyzer(embedding_dimensions=config.embedding_dimensions)
    raise ValueError(f"unknown analyzer {config.analyzer!r}; choose one of {', '.join(ANALYZERS)}")
