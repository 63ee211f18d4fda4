"""The headers every response carries: a strict Content-Security-Policy and friends.

The page loads scripts, styles and images from the gateway only, runs no inline script or
style, may not be framed, and sends no referrer; API responses are never cached.
"""

from __future__ import annotations

from multidict import CIMultiDict

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
_ALWAYS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def add_security_headers(headers: CIMultiDict[str], *, tls: bool, api: bool) -> None:
    """Add what ``headers`` does not set itself (a content response sets its own policy)."""
    for name, value in _ALWAYS.items():
        headers.setdefault(name, value)
    if api:
        headers.setdefault("Cache-Control", "no-store")
    else:
        # Static files: revalidate (ETag) so an upgraded gateway's page is never stale.
        headers.setdefault("Cache-Control", "no-cache")
    if tls:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
