"""The mediatag ingest service: accepts uploads, stores them, hands jobs to analysis."""
