"""The analysis domain: queue, workers, limiter, cache, status hub."""

__all__ = [
    "cache",
    "content",
    "hub",
    "limits",
    "maintenance",
    "models",
    "pacing",
    "queue",
    "stats",
    "watch",
    "workers",
]
