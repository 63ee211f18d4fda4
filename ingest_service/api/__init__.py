"""The gRPC surface of the ingest service: the servicer, who may call what, and the status
code of each error."""

from ingest_service.api.servicer import METHOD_ROLES, IngestServicer
from ingest_service.api.status_codes import STATUS_CODES

__all__ = ["METHOD_ROLES", "STATUS_CODES", "IngestServicer"]
