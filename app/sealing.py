"""Tenants' webhook secrets at rest: sealed with Fernet under a key derived from the service's secret.

The database holds ``gAAAA...`` Fernet tokens, not ``whsec_...`` values, so a copy of the
database alone does not let anyone forge webhooks. Rows written before sealing existed (or by
a tool that was not given the key) still read as they are, and are sealed by migration 0003
and at every API start (``seal_plaintext``).
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import text

PLAINTEXT_PREFIX = "whsec_"


def box(secret_key: bytes) -> Fernet:
    """The Fernet key for webhook secrets: HKDF-SHA256 of the service's secret key, its own use."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ligo-grow webhook secrets v1").derive(secret_key)
    return Fernet(base64.urlsafe_b64encode(key))


def seal(fernet: Fernet | None, secret: str) -> str:
    return secret if fernet is None else fernet.encrypt(secret.encode()).decode()


def unseal(fernet: Fernet | None, stored: str) -> str:
    if stored.startswith(PLAINTEXT_PREFIX):
        return stored  # written before sealing, or by a tool without the key
    if fernet is None:
        raise ValueError("this webhook secret is sealed; open the database with the service's secret key")
    try:
        return fernet.decrypt(stored.encode()).decode()
    except InvalidToken:
        raise ValueError("this webhook secret was sealed with another secret key (LIGO_SECRET_KEY changed?)") from None


SEALED = text("SELECT name, webhook_secret FROM tenants WHERE webhook_secret NOT LIKE 'whsec!_%' ESCAPE '!'")
PLAINTEXT = text("SELECT name, webhook_secret FROM tenants WHERE webhook_secret LIKE 'whsec!_%' ESCAPE '!'")


def _rewrite(connection, sealed: bool, change) -> int:
    """Apply ``change`` to every sealed (or plaintext) secret of the tenants table (Core, in a transaction)."""
    rows = connection.execute(SEALED if sealed else PLAINTEXT).all()
    for name, secret in rows:
        connection.execute(text("UPDATE tenants SET webhook_secret = :new WHERE name = :name AND "
                                "webhook_secret = :old"), {"new": change(secret), "name": name, "old": secret})
    return len(rows)


def seal_plaintext(connection, fernet: Fernet) -> int:
    return _rewrite(connection, False, lambda secret: seal(fernet, secret))


def open_sealed(connection, fernet: Fernet) -> int:
    return _rewrite(connection, True, lambda stored: unseal(fernet, stored))
