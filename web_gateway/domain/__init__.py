"""What the gateway knows beyond one request: shared upstream watches, sessions, throughput."""

__all__ = ["events", "sessions", "throughput", "watches"]
