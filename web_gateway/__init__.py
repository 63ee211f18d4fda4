"""The web gateway: JSON over HTTP, Server-Sent Events and the dashboard, over the services'
public gRPC API (``mediatag serve web``).

Its surface is ``server.create_server(config)`` (and ``server.WebHost``, what it serves on),
the configuration in ``config`` and its refusals in ``errors``; ``api`` (the HTTP routes),
``domain`` (shared watches, sessions, throughput), ``upstream`` (its gRPC clients of the
services) and ``protojson`` are its insides.
"""

__all__ = ["config", "errors", "server"]
