"""API tokens and browser sessions of the web worklist.

Decisions:

- A token is ``cxr_`` + 43 URL-safe characters (``secrets.token_urlsafe(32)``, 256 bits). Only
  its SHA-256 is stored (``api_tokens.token_sha256``): a token is found by its hash (an index
  lookup) and the stored hash is then compared with :func:`hmac.compare_digest`. A fast hash
  is enough for 256 random bits (nothing to guess); no salt is needed for the same reason.
- Roles: ``reader`` (the list, studies, images, marking read, the events) and ``admin``
  (also replay, dead-letter retry, pause/resume sending, the admin summary).
- A token's ``name`` is who did something (``study_reads.read_by``): unique, and never
  reused after a revocation, so that record keeps meaning one token.
- ``last_used_at`` is written at most once a minute per token (not a write per request).
- Browser sessions are rows, not signed cookies: the cookie holds 256 random bits, the table
  their SHA-256 and the token they were opened with, so revoking a token ends its sessions at
  once and no signing key has to be shared between ``serve`` and ``web`` processes. The
  CSRF token of a session is derived from the cookie's value (HMAC-SHA256), so it is never
  stored and only the holder of the cookie (which scripts cannot read: HttpOnly) and the
  page it was given to know it.
- Neither tokens nor cookie values are ever logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cxr_worker.worklist.models import ApiSession, ApiToken, utcnow

ROLES = ("reader", "admin")
TOKEN_PREFIX = "cxr_"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
LAST_USED_EVERY = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the token's name and role; ``via`` says how it came
    (``bearer``, ``session`` or ``none`` when ``[http] auth = "none"``)."""

    name: str
    role: str
    via: str
    token_id: int | None = None

    def has(self, role: str) -> bool:
        return role == "reader" or self.role == "admin"


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def as_json(self) -> dict[str, str | None]:
        def iso(t: dt.datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {"name": self.name, "role": self.role, "created_at": iso(self.created_at),
                "last_used_at": iso(self.last_used_at), "revoked_at": iso(self.revoked_at)}


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"token name {name!r}: 1-64 letters, digits and . _ @ + -, starting "
                         "with a letter or digit")


def create(engine: Engine, name: str, role: str) -> str:
    """A new token (returned once; only its hash is kept). ``ValueError`` for a name that is
    not valid or already used (revoked tokens keep theirs), or a role not in :data:`ROLES`."""
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with Session(engine) as s, s.begin():
            if s.scalars(select(ApiToken.id).where(ApiToken.name == name)).first() is not None:
                raise ValueError(f"token name {name!r} is taken (names are never reused, even "
                                 "after 'token revoke'): choose another")
            s.add(ApiToken(name=name, role=role, token_sha256=sha256(token)))
    except IntegrityError as exc:  # created at the same moment elsewhere
        raise ValueError(f"token name {name!r} is taken: choose another") from exc
    return token


def list_tokens(engine: Engine) -> list[TokenInfo]:
    with Session(engine) as s:
        return [TokenInfo(t.name, t.role, t.created_at, t.last_used_at, t.revoked_at)
                for t in s.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke(engine: Engine, name: str) -> bool:
    """Revoke the token ``name`` and end its sessions; False if it was revoked already.
    ``LookupError`` when there is no such token."""
    with Session(engine) as s, s.begin():
        row = s.scalars(select(ApiToken).where(ApiToken.name == name)).one_or_none()
        if row is None:
            raise LookupError(f"no token named {name!r} ('cxr-worker token list' shows them)")
        s.execute(delete(ApiSession).where(ApiSession.token_id == row.id))
        if row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        return True


def verify(engine: Engine, token: str, via: str = "bearer") -> Principal | None:
    """The principal of a valid, unrevoked token; None otherwise."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = sha256(token)
    now = utcnow()
    with Session(engine) as s, s.begin():
        row = s.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).one_or_none()
        if row is None or not hmac.compare_digest(row.token_sha256, digest) \
                or row.revoked_at is not None:
            return None
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
            row.last_used_at = now
        return Principal(row.name, row.role, via, row.id)


def open_session(engine: Engine, principal: Principal, hours: float) -> tuple[str, dt.datetime]:
    """A new browser session for ``principal`` (from a token): the cookie value and when it
    expires. Expired sessions are cleared on the way."""
    assert principal.token_id is not None
    value = secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + dt.timedelta(hours=hours)
    with Session(engine) as s, s.begin():
        s.execute(delete(ApiSession).where(ApiSession.expires_at < now))
        s.add(ApiSession(session_sha256=sha256(value), token_id=principal.token_id,
                         created_at=now, expires_at=expires))
    return value, expires


def session_principal(engine: Engine, value: str) -> Principal | None:
    """The principal of a live session cookie (its token not revoked); None otherwise."""
    if not value or len(value) > 200:
        return None
    digest = sha256(value)
    now = utcnow()
    with Session(engine) as s, s.begin():
        row = s.execute(
            select(ApiSession, ApiToken).join(ApiToken, ApiToken.id == ApiSession.token_id)
            .where(ApiSession.session_sha256 == digest)).one_or_none()
        if row is None:
            return None
        sess, tok = row
        if not hmac.compare_digest(sess.session_sha256, digest) or sess.expires_at <= now \
                or tok.revoked_at is not None:
            return None
        if tok.last_used_at is None or now - tok.last_used_at >= LAST_USED_EVERY:
            s.execute(update(ApiToken).where(ApiToken.id == tok.id).values(last_used_at=now))
        return Principal(tok.name, tok.role, "session", tok.id)


def close_session(engine: Engine, value: str) -> None:
    with Session(engine) as s, s.begin():
        s.execute(delete(ApiSession).where(ApiSession.session_sha256 == sha256(value)))


def csrf_token(secret: str) -> str:
    """The CSRF token that goes with a session cookie value (or any per-process secret)."""
    return hmac.new(secret.encode(), b"cxr-worker csrf", hashlib.sha256).hexdigest()


def csrf_ok(secret: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(secret), presented or "")
