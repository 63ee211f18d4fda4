"""An embedding as both services store it: float32 values, packed into bytes.

The analysis service keeps each result's embedding, the ingest service its mirror of it;
both columns hold what :func:`embedding_to_bytes` writes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def embedding_to_bytes(embedding: npt.ArrayLike) -> bytes:
    """The column value of ``embedding``: its values as float32, in numpy's native order."""
    return np.asarray(embedding, dtype=np.float32).tobytes()


def embedding_from_bytes(stored: bytes) -> npt.NDArray[np.float32]:
    """The embedding a column value holds (a read-only view of ``stored``)."""
    return np.frombuffer(stored, dtype=np.float32)
