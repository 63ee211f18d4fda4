"""What the ingest service does, free of protobuf and SQL (except at the analysis client edge)."""

__all__ = [
    "blob_sweep",
    "blobs",
    "library",
    "mirror",
    "models",
    "observer",
    "outbox",
    "requests",
    "sniff",
    "store",
    "stream_pace",
    "stream_upload",
    "uploads",
    "webhook_endpoints",
    "webhooks",
]
