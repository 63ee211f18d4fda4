"""What both services (and their clients) share.

- ``errors``: the root of the exception trees and reading refusals back; ``status``: their
  gRPC status codes and the error-mapping interceptor; ``interceptors``: the base of both;
- ``auth``: tokens, roles, the owner scope; ``tls``: certificates and credentials;
- ``callers``, ``caller_slots``: who is calling, and the bounded shares of slots (watch and
  upload streams) callers hold; ``request_bodies``: request messages read once a call is
  admitted, within a memory budget (``byte_budget``, shared by callers in turn);
  ``untrusted_text``: client text shown to others;
- ``grpc_server``: server options, health, start/drain/stop, channels;
- ``database``, ``migrations``, ``keys``, ``group_commit``: SQLite/PostgreSQL access, schema
  versions, stored secrets, batched commits; ``database_copy``: a service's database copied
  into a new one (SQLite to PostgreSQL);
- ``paging``: AIP-158 page tokens; ``backoff``, ``tasks``: retry delays and task shutdown;
- ``metrics``: each service's Prometheus registry and endpoint; ``log_limits``: log lines a
  client can cause, at most one per kind and interval; ``service_wiring``: the
  metrics endpoint and listening gRPC server both ``create_server`` build from their config;
- ``embeddings``: an embedding as stored bytes; ``proto_time``: seconds as protobuf
  Timestamp and Duration;
- ``settings``: how a config field declares its flag and variable; ``values``: parsers of
  setting values; ``service_config``: the settings both services share.
"""

__all__ = [
    "auth",
    "backoff",
    "byte_budget",
    "caller_slots",
    "callers",
    "database",
    "database_copy",
    "embeddings",
    "errors",
    "group_commit",
    "grpc_server",
    "interceptors",
    "keys",
    "log_limits",
    "metrics",
    "migrations",
    "paging",
    "proto_time",
    "request_bodies",
    "service_config",
    "service_wiring",
    "settings",
    "status",
    "tasks",
    "tls",
    "untrusted_text",
    "values",
]
