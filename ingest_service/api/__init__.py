"""The gRPC surface of the ingest service."""
