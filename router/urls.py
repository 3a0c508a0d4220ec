"""The URLs the router hands out for files, signed so they work without a header.

Every artifact URL in an answer (results, status look-ups, callbacks, event streams, QueryJobs)
carries ``exp`` (a unix time) and ``sig``: an HMAC-SHA256, with the router's URL secret, over the
file's path (``/artifacts/<name>``) and ``exp``, like a presigned S3 URL. Until it expires such a URL
works with no Authorization header, so an ``<img src>``, a link in a chat, a CDN in front of the
router, or AI Server's own ``GetBytesFromUrl()`` can fetch it; the same signature also opens the
file's variants (``/variants/<variant>/<name>``: smaller copies of the same picture). Routers that
share the secret (``router.url_secret``) accept each other's URLs. A key's bearer header still works
without a signature, for the key's own files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass


class UrlSigner:
    def __init__(self, secret: str, ttl_s: float) -> None:
        self._key = secret.encode()
        self.ttl_s = ttl_s

    def query(self, path: str, now: float) -> str:
        """``exp=...&sig=...`` for ``path``, good for ``ttl_s`` from ``now``."""
        expires = int(now + self.ttl_s)
        return f"exp={expires}&sig={self._mac(path, expires)}"

    def problem(self, path: str, exp: str | None, sig: str | None, now: float) -> str | None:
        """Why a signed request for ``path`` may not have it, or None."""
        if not exp or not sig:
            return "the URL is not completely signed: it needs both exp and sig"
        try:
            expires = int(exp)
        except ValueError:
            return "the URL's exp is not a unix time"
        if not hmac.compare_digest(sig.encode(), self._mac(path, expires).encode()):
            return "the URL's signature does not match its path and expiry: it was altered or forged"
        if expires < now:
            return f"the signed URL expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}"
        return None

    def _mac(self, path: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def file_path(name: str) -> str:
    """The path a file's signature covers."""
    return f"/artifacts/{name}"


@dataclass(frozen=True)
class Links:
    """File URLs for one answer: where clients reach the router, signed from ``now``."""

    base: str
    signer: UrlSigner
    now: float

    def file(self, name: str) -> str:
        path = file_path(name)
        return f"{self.base}{path}?{self.signer.query(path, self.now)}"

    def variant(self, variant: str, name: str) -> str:
        return f"{self.base}/variants/{variant}/{name}?{self.signer.query(file_path(name), self.now)}"
