"""Webhooks on terminal job states, signed per Standard Webhooks, retried with backoff.

Headers: ``webhook-id`` (the same on every retry of one event), ``webhook-timestamp`` (Unix
seconds), ``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}"))
where the secret is the tenant's ``whsec_...`` value (the bytes after the prefix, base64-decoded).
Deliveries come from the outbox table, so none is lost if the API restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update

from app.db import Database, Tenant, WebhookDelivery, utcnow
from app.sealing import unseal

log = logging.getLogger("ligo.webhooks")
RETRIED_4XX = (408, 429)  # other 4xx answers are the receiver's final word: not retried


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict, body: str, tolerance: int = 300) -> bool:
    """What a receiver does (used by the tests): check the signature and the timestamp."""
    msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    if abs(time.time() - ts) > tolerance:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, sig) for sig in headers["webhook-signature"].split())


def _blocked_address(url: str) -> tuple[str, bool] | None:
    """Refuse callbacks to loopback, private and link-local addresses (SSRF), unless allowed:
    (why, final) where final means no retry can succeed; None for a public address."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return f"cannot resolve {host!r}", False  # DNS may come back
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return f"{host} resolves to a non-public address ({ip})", True
    return None


def backoff(attempt: int, base: float, cap: float) -> float:
    return min(cap, base * 2 ** max(0, attempt - 1))


class WebhookSender:
    def __init__(self, db: Database, settings):
        self.db, self.settings = db, settings
        self.client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)

    def close(self) -> None:
        self.client.close()

    def deliver_due(self, limit: int = 50) -> int:
        now = utcnow()
        with self.db.read() as s:
            due = s.execute(
                select(WebhookDelivery, Tenant.webhook_secret)
                .join(Tenant, Tenant.name == WebhookDelivery.tenant)
                .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None),
                       WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)
            ).all()
        sent = 0
        for row, secret in due:
            # Claim this attempt (other API replicas skip it): push next_attempt_at forward.
            hold = now + timedelta(seconds=self.settings.webhook_timeout_seconds * 3)
            with self.db.write() as s:
                claimed = s.execute(update(WebhookDelivery).where(
                    WebhookDelivery.id == row.id, WebhookDelivery.attempts == row.attempts,
                    WebhookDelivery.delivered_at.is_(None)).values(next_attempt_at=hold,
                                                                 attempts=row.attempts + 1)).rowcount == 1
            if claimed:
                sent += self._attempt(row, secret, row.attempts + 1)
        return sent

    def _attempt(self, row: WebhookDelivery, secret: str, attempt: int) -> bool:
        status, error, final = None, None, False
        host = urlsplit(row.url).hostname or "?"  # logs and errors name the host, never the full URL
        blocked = None if self.settings.webhook_allow_private else _blocked_address(row.url)
        if blocked:
            error, final = blocked
        else:
            ts = int(time.time())
            try:
                headers = {"content-type": "application/json", "webhook-id": row.id, "webhook-timestamp": str(ts),
                           "webhook-signature": sign(unseal(self.db.fernet, secret), row.id, ts, row.payload),
                           "user-agent": "ligo-webhooks/1"}
                resp = self.client.post(row.url, content=row.payload.encode(), headers=headers)
                status = resp.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
                    final = 400 <= status < 500 and status not in RETRIED_4XX
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__} from {host}"
            except ValueError as exc:  # the secret cannot be opened: no retry will help
                error, final = str(exc), True
        now = utcnow()
        values = dict(last_status=status, last_error=error)
        if error is None:
            values["delivered_at"] = now
        elif final or attempt >= self.settings.webhook_max_attempts:
            values["failed_at"] = now
            log.warning("webhook %s to %s failed for good after %d attempt(s): %s", row.id, host, attempt, error)
        else:
            delay = backoff(attempt, self.settings.webhook_backoff_seconds, self.settings.webhook_backoff_max_seconds)
            values["next_attempt_at"] = now + timedelta(seconds=delay)
        with self.db.write() as s:
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values))
        return error is None
