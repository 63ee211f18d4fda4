"""``mediatag copy-database``: a service's database into a new one (SQLite to PostgreSQL)."""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import urlsplit, urlunsplit

from analysis_service.config import AnalysisConfig
from analysis_service.storage import schema as analysis_schema
from ingest_service.config import IngestConfig
from ingest_service.storage import schema as ingest_schema
from mediatag_common.database import DatabaseError, safe_url
from mediatag_common.database_copy import CopyError, ServiceSchema, copy_database
from mediatag_common.keys import SECRETS

SCHEMAS = {
    schema.service: schema
    for schema in (
        ServiceSchema(
            AnalysisConfig.SERVICE,
            (*analysis_schema.metadata.tables.values(), SECRETS),
            analysis_schema.MIGRATIONS,
            analysis_schema.MIGRATIONS_LOCK,
            sole_process=True,
        ),
        ServiceSchema(
            IngestConfig.SERVICE,
            (*ingest_schema.metadata.tables.values(), SECRETS),
            ingest_schema.MIGRATIONS,
            ingest_schema.MIGRATIONS_LOCK,
        ),
    )
}


async def copy_service_database(service: str, source_url: str, destination_url: str) -> int:
    """Copy ``service``'s database; prints what each table received; the exit status.

    Cancelled (Ctrl-C), it says that nothing was copied and lets the cancellation go on; a
    copy that committed before it could stop is reported as copied.
    """
    source, destination = _shown_url(source_url), _shown_url(destination_url)
    try:
        copied = await copy_database(SCHEMAS[service], source_url, destination_url)
    except (CopyError, DatabaseError) as exc:
        print(f"nothing copied: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("interrupted: nothing was copied", file=sys.stderr)
        raise
    print(f"copied the {service} database {source} into {destination}")
    width = max(len(table.table) for table in copied)
    for table in copied:
        next_id = f"  (next id {table.next_id})" if table.next_id is not None else ""
        print(f"  {table.table:<{width}}  {table.rows:>10,} row(s){next_id}")
    print(
        f"Start the {service} service with --{service}-database-url {destination} "
        f"(or MEDIATAG_{service.upper()}_DATABASE_URL)."
    )
    return 0


def _shown_url(url: str) -> str:
    """``url`` for the user, its password hidden; an empty one is left out, as ``***`` would
    say there is one to fill in."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if colon and not password:
        url = urlunsplit(parts._replace(netloc=f"{user}{at}{hosts}"))
    return safe_url(url)
