"""The HTTP surface: requests and JSON <-> protobuf, errors as ``google.rpc.Status`` JSON."""

__all__ = [
    "app",
    "callers",
    "context",
    "errors",
    "events",
    "headers",
    "media",
    "queue",
    "session",
    "webhooks",
]
