"""What the ingest service does, free of protobuf and SQL (except at the analysis client edge)."""
