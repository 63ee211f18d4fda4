"""What both services (and their clients) share.

- ``errors``: the root of the exception trees and reading refusals back; ``status``: their
  gRPC status codes and the error-mapping interceptor; ``interceptors``: the base of both;
- ``auth``: tokens, roles, the owner scope; ``tls``: certificates and credentials;
- ``grpc_server``: server options, health, start/drain/stop, channels;
- ``database``, ``threaded_database``, ``group_commit``: SQLAlchemy access and batched commits;
- ``paging``: AIP-158 page tokens; ``backoff``, ``tasks``: retry delays and task shutdown;
- ``metrics``: each service's Prometheus registry and endpoint;
- ``settings``: how a config field declares its flag and variable; ``values``: parsers of
  setting values; ``service_config``: the settings both services share.
"""

__all__ = [
    "auth",
    "backoff",
    "database",
    "errors",
    "group_commit",
    "grpc_server",
    "interceptors",
    "metrics",
    "paging",
    "service_config",
    "settings",
    "status",
    "tasks",
    "threaded_database",
    "tls",
    "values",
]
