"""Questions a test asks inside an analysis process. A module of its own, light to import:
the process runs at idle priority, and importing a test module (pytest, numpy, the
fixtures) there beside programs that keep the cores busy took minutes."""

from __future__ import annotations

from analysis_service.analyzers import local_embedding


def projections_made() -> int:
    """How many embedding projections this process has built."""
    return local_embedding._projection.cache_info().currsize
