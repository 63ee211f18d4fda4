"""The analysis service's database: schema, migrations, queries."""

__all__ = ["events", "jobs", "schema", "session"]
