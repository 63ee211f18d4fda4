"""What a benchmark is to ``python -m bench``: a name, its flags, and a run that reports."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

# The figures a benchmark measured, as JSON-ready values.
Figures = Mapping[str, object]


def positive(text: str) -> int:
    """An argparse type: a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a positive number."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    ``add_arguments`` declares its flags (prefixed with its name, so benchmarks never clash);
    ``run`` prints its set-up and results and returns the figures for ``--json``.
    """

    name: str
    summary: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, Figures]]
