"""Who may call what of the ingest service, for the service and for the web gateway.

The ingest service's :class:`~mediatag_common.auth.interceptor.AuthInterceptor` checks each
call against this table; the web gateway checks an upload against it too, before it reads
the body (the gateway may not import the service, so the table lives here, below both).
"""

from __future__ import annotations

from mediatag_common.auth.interceptor import MethodRoles
from mediatag_common.auth.tokens import SERVICE, UPLOADER, VIEWER

INGEST_SERVICE = "mediatag.ingest.v1.IngestService"
# Admin may call everything, and alone what is not listed (RetryWebhookDeliveries).
# Uploaders read and reprocess their owners' items; the analysis service (role ``service``)
# fetches content; viewers see the webhook deliveries not yet made.
INGEST_METHOD_ROLES: MethodRoles = {
    f"/{INGEST_SERVICE}/{method}": frozenset(roles)
    for method, roles in {
        "UploadMedia": {UPLOADER},
        "UploadMediaStream": {UPLOADER},
        "GetMedia": {UPLOADER, VIEWER},
        "ListMedia": {UPLOADER, VIEWER},
        "ReprocessMedia": {UPLOADER},
        "ReadMediaContent": {UPLOADER, VIEWER, SERVICE},
        "ReadMediaContents": {SERVICE},
        "ListWebhookDeliveries": {VIEWER},
    }.items()
}
