"""The mediatag ingest service: accepts uploads, stores them, hands jobs to analysis.

Its surface is ``server.create_server(config)``, the configuration in ``config`` and the
exception tree in ``errors``; ``api``, ``domain``, ``storage`` and ``metrics`` are its insides.
"""

__all__ = ["config", "errors", "server"]
