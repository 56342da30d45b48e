"""Who is calling: API keys known by their sha256, compared in constant time over all of them.

Keys are never kept, logged or compared in plain text: the config may give each key or its
hash, the key ring holds only digests, and a caller is known by a name (the configured one or
`key-<hash prefix>`), which is what rate limits and logs use.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from serving.config import AuthSettings


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool = False
    requests_per_minute: int | None = None  # None: the server's default limit
    feedback_per_minute: int | None = None


ANONYMOUS = Caller("anonymous")


class KeyRing:
    def __init__(self, auth: AuthSettings):
        self.entries: list[tuple[bytes, Caller]] = []
        admin = auth.admin_digest()
        if admin is not None:
            self.entries.append((bytes.fromhex(admin), Caller("admin", admin=True)))
        for key in auth.client_keys():
            digest = key.digest()
            name = key.name or f"key-{digest[:8]}"
            self.entries.append(
                (bytes.fromhex(digest), Caller(name, False, key.requests_per_minute, key.feedback_per_minute))
            )
        self.has_admin = admin is not None
        self.allow_anonymous = auth.allow_anonymous

    def identify(self, token: bytes) -> Caller | None:
        """The caller whose key this is, or None. Every digest is compared, with no early exit, so
        the time taken says nothing about which key (or how much of one) matched."""
        digest = hashlib.sha256(token).digest()
        found = None
        for known, caller in self.entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = caller
        return found


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The raw token of an `Authorization: Bearer <token>` header (bytes: any octets are fine)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()
