"""Tables and queries of the ingest database."""

__all__ = ["repository", "schema"]
