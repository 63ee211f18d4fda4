"""The analysis domain: queue, workers, limiter, cache, status hub."""
