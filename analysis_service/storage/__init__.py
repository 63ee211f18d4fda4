"""The analysis service's database: schema, migrations, queries, and ``queue_store``, the SQL
implementation of :class:`~analysis_service.domain.store.QueueStore` (SQLite and PostgreSQL)."""

__all__ = [
    "clock",
    "events",
    "job_reads",
    "jobs",
    "queue_store",
    "rate_limits",
    "replicas",
    "results",
    "schema",
    "session",
    "tailer",
]
