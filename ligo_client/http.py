"""Requests with retries: connection errors and 429/502/503/504 are tried again, after the
server's ``Retry-After`` when it sends one, else after an exponential back-off; any other
error answer becomes an exception carrying the RFC 9457 problem."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from ligo_client.errors import HTTPProblem, RequestRejected, ServiceUnreachable

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER = 300.0  # a server asking for longer than this is not waited for in one sleep


def retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the server asks us to wait (``Retry-After`` as seconds or an HTTP date), bounded."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a transient failure is tried again."""

    attempts: int = 6  # retries after the first try
    backoff: float = 1.0  # first delay; doubles up to max_delay
    max_delay: float = 30.0

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        hint = retry_after(response)
        return hint if hint is not None else min(self.backoff * 2**attempt, self.max_delay)


def problem_of(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    text = response.text.strip()[:300]
    return {"title": response.reason_phrase, "status": response.status_code, "detail": text or response.reason_phrase}


def raise_for_problem(response: httpx.Response, what: str) -> httpx.Response:
    if response.status_code < 400:
        return response
    response.read()
    cls = RequestRejected if response.status_code < 500 else HTTPProblem
    raise cls(response.status_code, problem_of(response), what)


def send(http: httpx.Client, method: str, url: str, *, retry: Retry, what: str | None = None,
         content: Callable[[], object] | bytes | None = None, stream: bool = False,
         on_retry: Callable[[dict], None] | None = None, **kw) -> httpx.Response:
    """One request, retried while the failure is transient. ``content`` may be a callable giving a
    fresh body per attempt (a file read as it is sent). With ``stream`` the caller closes the answer."""
    what = what or f"{method} {url.split('?', 1)[0]}"
    for attempt in range(retry.attempts + 1):
        body = content() if callable(content) else content
        response = None
        try:
            response = http.send(http.build_request(method, url, content=body, **kw), stream=stream)
        except httpx.TransportError as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if attempt == retry.attempts:
                raise ServiceUnreachable(f"{what}: {reason} (tried {attempt + 1} times)") from exc
        else:
            if response.status_code not in RETRY_STATUSES or attempt == retry.attempts:
                try:
                    return raise_for_problem(response, what)
                except BaseException:
                    response.close()
                    raise
            reason = f"HTTP {response.status_code}"
            response.close()
        delay = retry.delay(attempt, response)
        if on_retry is not None:
            on_retry({"stage": "retrying", "what": what, "attempt": attempt + 1, "reason": reason, "delay": delay})
        time.sleep(delay)
    raise AssertionError("unreachable")
