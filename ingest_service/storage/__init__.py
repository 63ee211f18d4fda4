"""Tables and queries of the ingest database."""
