"""The ops page's sign-in: a signed session cookie and the CSRF token of its forms.

Two roles sign in:
- `ops`: the ops credential of the settings (`PARTNERBUS_OPS_USER` and
  `PARTNERBUS_OPS_PASSWORD`, the one `/metrics` takes as HTTP Basic);
- `partner`: a partner's staff, with the partner's HTTP gateway token (`partnerbus gateway
  token issue`, only its SHA-256 kept in `PARTNERBUS_GATEWAY_TOKENS_PATH`): no new password
  store. The session keeps the token's digest, looked up again at every request, so that a
  revoked token ends its sessions at once.

The cookie is `base64url(JSON).base64url(HMAC-SHA256)`, keyed by a key derived from the
ops password (changing the password ends every session); it carries an expiry and a random
CSRF token that every POST form must send back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

COOKIE = "partnerbus_ops"
MAX_COOKIE_CHARS = 1024
Role = Literal["ops", "partner"]


@dataclass(frozen=True)
class Session:
    role: Role
    partner: str | None
    """The partner whose staff signed in (role `partner`), else None."""
    csrf: str
    expires: int
    token_digest: str | None = None
    """A partner session: the digest of the gateway token it signed in with."""

    def may_see(self, partner_id: str | None) -> bool:
        return self.role == "ops" or (partner_id is not None and partner_id == self.partner)


def session_key(ops_password: str) -> bytes:
    return hmac.new(ops_password.encode(), b"partnerbus ops session v1", hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_session(
    role: Role, partner: str | None, max_age_s: int, token_digest: str | None = None
) -> Session:
    return Session(
        role, partner, secrets.token_urlsafe(24), int(time.time()) + max_age_s, token_digest
    )


def sign(session: Session, key: bytes) -> str:
    payload = _b64(
        json.dumps(
            {
                "r": session.role,
                "p": session.partner,
                "c": session.csrf,
                "e": session.expires,
                "d": session.token_digest,
            },
            separators=(",", ":"),
        ).encode()
    )
    mac = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def verify(cookie: str | None, key: bytes, now: float | None = None) -> Session | None:
    """The session of a cookie this page signed and that has not expired; None for
    anything else (absent, too long, malformed, forged, expired)."""
    if not cookie or len(cookie) > MAX_COOKIE_CHARS or cookie.count(".") != 1:
        return None
    payload, _, mac = cookie.partition(".")
    try:
        given = _unb64(mac)
        expected = hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            return None
        data = json.loads(_unb64(payload))
    except (binascii.Error, ValueError, UnicodeError):
        return None
    if not isinstance(data, dict):
        return None
    role, partner, csrf, expires = data.get("r"), data.get("p"), data.get("c"), data.get("e")
    digest = data.get("d")
    if role not in ("ops", "partner") or not isinstance(csrf, str) or not isinstance(expires, int):
        return None
    if role == "partner" and (not isinstance(partner, str) or not isinstance(digest, str)):
        return None
    if expires < (time.time() if now is None else now):
        return None
    return Session(role, partner if role == "partner" else None, csrf, expires, digest)


def csrf_ok(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())
