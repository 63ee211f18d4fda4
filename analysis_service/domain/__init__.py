"""The analysis domain: queue, workers, limiter, cache, status hub."""

__all__ = [
    "cache",
    "clock",
    "content",
    "hub",
    "limits",
    "maintenance",
    "models",
    "observer",
    "pacing",
    "queue",
    "queue_status",
    "replicas",
    "stats",
    "store",
    "watch",
    "workers",
]
