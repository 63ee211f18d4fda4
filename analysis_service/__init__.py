"""The mediatag analysis service: durable job queue, analyser workers, status events.

Its surface is ``server.create_server(config)``, the configuration in ``config`` and the
exception tree in ``errors``; ``api``, ``domain``, ``storage``, ``analyzers``, ``metrics``
and ``ingest_content`` (its gRPC client of ingest) are its insides.
"""

__all__ = ["config", "errors", "server"]
