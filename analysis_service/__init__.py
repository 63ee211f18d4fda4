"""The mediatag analysis service: durable job queue, analyser workers, status events."""
