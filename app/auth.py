"""API keys: random bearer tokens, stored as SHA-256 hashes, each belonging to one tenant.

Keys carry 256 random bits, so a fast hash is enough (nothing to brute-force); the table
holds the hash and a short prefix to recognise a key by, never the key itself.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select

from app.db import ApiKey, Database, Tenant, utcnow
from app.problems import Problem
from app.sealing import seal, unseal

KEY_PREFIX = "ligo_"
TENANT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def check_tenant_name(tenant: str) -> str:
    if not tenant or len(tenant) > 64 or not set(tenant) <= TENANT_CHARS:
        raise ValueError("a tenant name is 1-64 letters, digits, '-', '_' or '.'")
    return tenant


def ensure_tenant(db: Database, tenant: str) -> Tenant:
    check_tenant_name(tenant)
    with db.write() as s:
        row = s.get(Tenant, tenant)
        if row is None:
            row = Tenant(name=tenant, webhook_secret=seal(db.fernet, new_webhook_secret()))
            s.add(row)
        return row


def webhook_secret(db: Database, tenant: str) -> str:
    """The tenant's ``whsec_...`` secret in clear (the database holds it sealed)."""
    return unseal(db.fernet, ensure_tenant(db, tenant).webhook_secret)


def create_key(db: Database, tenant: str, name: str | None = None) -> str:
    """Make a key for ``tenant`` (created if new); returns the key, shown only this once."""
    ensure_tenant(db, tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.write() as s:
        s.add(ApiKey(tenant=tenant, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6], name=name))
    return key


def revoke_key(db: Database, prefix: str) -> int:
    with db.write() as s:
        rows = s.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
        for row in rows:
            row.revoked_at = utcnow()
        return len(rows)


class Authenticator:
    """Key -> tenant, with a short in-process cache (a revoked key stops working within ttl)."""

    def __init__(self, db: Database, ttl: float = 10.0):
        self.db, self.ttl = db, ttl
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()

    def _lookup(self, digest: str) -> str | None:
        with self.db.read() as s:
            return s.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))

    async def tenant_for(self, key: str) -> str | None:
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant = await self.db.call(self._lookup, digest)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (tenant, now + self.ttl)
        return tenant


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="ligo"'})


async def require_tenant(request: Request) -> str:
    """The tenant of the request's API key (``Authorization: Bearer <key>``), or a 401.

    Read straight from the header rather than through FastAPI's HTTPBearer: one dependency
    less on every request. The OpenAPI document declares the scheme (see app.main).
    """
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("send an API key as 'Authorization: Bearer <key>'")
    tenant = await request.app.state.services.auth.tenant_for(key.strip())
    if tenant is None:
        raise unauthorized("the API key is not valid")
    return tenant


CurrentTenant = Annotated[str, Depends(require_tenant)]
