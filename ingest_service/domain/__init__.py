"""What the ingest service does, free of gRPC, protobuf and SQL."""

__all__ = [
    "analysis",
    "blob_sweep",
    "blobs",
    "library",
    "mirror",
    "models",
    "observer",
    "outbox",
    "pages",
    "requests",
    "sniff",
    "store",
    "stream_pace",
    "stream_upload",
    "uploads",
    "webhook_backlog",
    "webhook_endpoints",
    "webhooks",
]
