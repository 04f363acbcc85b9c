"""A client for the ligo growth service: upload a checkpoint, grow it, wait, download it verified.

Needs only httpx (``pip install 'ligo-grow[client]'``); imports neither torch nor the engine.

    from ligo_client import Client
    with Client("https://ligo.example.com", api_key) as c:
        job = c.grow("path/to/small-model", "gpt2-medium", fit={"steps": 100})
        c.download(job, "grown")
"""

from ligo_client.client import Client, derive_idempotency_key
from ligo_client.errors import (
    BadInput,
    HTTPProblem,
    IntegrityError,
    JobCancelled,
    JobEnded,
    JobFailed,
    JobTimeout,
    LigoClientError,
    RequestRejected,
    ServiceUnreachable,
)
from ligo_client.http import Retry

__all__ = [
    "BadInput", "Client", "HTTPProblem", "IntegrityError", "JobCancelled", "JobEnded", "JobFailed", "JobTimeout",
    "LigoClientError", "RequestRejected", "Retry", "ServiceUnreachable", "derive_idempotency_key",
]
