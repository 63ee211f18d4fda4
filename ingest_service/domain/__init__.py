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
    "requests",
    "sniff",
    "store",
    "stream_pace",
    "stream_upload",
    "uploads",
    "webhook_endpoints",
    "webhooks",
]
