"""The analysis service's gRPC layer: the servicer, who may call what, and the status code of
each error."""

from analysis_service.api.servicer import METHOD_ROLES, AnalysisServicer
from analysis_service.api.status_codes import STATUS_CODES

__all__ = ["METHOD_ROLES", "STATUS_CODES", "AnalysisServicer"]
