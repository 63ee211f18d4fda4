"""The ingest service's database: tables, queries, and the SQL implementations of the domain's
stores (``sql_store``: :class:`~ingest_service.domain.store.IngestStore`; ``sql_deliveries``:
the webhook deliveries' store)."""

__all__ = [
    "outbox",
    "repository",
    "schema",
    "sql_deliveries",
    "sql_store",
    "webhook_deliveries",
]
