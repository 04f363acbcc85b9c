"""What can go wrong, as exception types a pipeline can branch on (the CLI maps them to exit codes)."""

from __future__ import annotations


class LigoClientError(Exception):
    """Anything the client could not do."""


class BadInput(LigoClientError):
    """The request cannot work as given: a missing file, an unknown job, a field the service refused."""


class ServiceUnreachable(LigoClientError):
    """The service (or a storage link) did not answer, even after retrying."""


class HTTPProblem(LigoClientError):
    """An error answer of the service, with its RFC 9457 problem (``type``, ``title``, ``detail``, ``errors``)."""

    def __init__(self, status: int, problem: dict, request: str = ""):
        self.status, self.problem, self.request = status, problem, request
        self.type = str(problem.get("type") or "about:blank")
        self.errors = [e for e in problem.get("errors") or [] if isinstance(e, dict)]
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in self.errors if e.get("field"))
        super().__init__(f"{request + ': ' if request else ''}{status} {detail}"
                         + (f" ({fields})" if fields and fields not in str(detail) else ""))

    @property
    def kind(self) -> str:
        """The problem's kind: ``validation``, ``not-found``, ``idempotency-key-reused``, ..."""
        return self.type.rsplit(":", 1)[-1]


class RequestRejected(HTTPProblem, BadInput):
    """A 4xx answer: the request itself is wrong (bad key, unknown id, invalid field, too large)."""


class IntegrityError(LigoClientError):
    """A downloaded file kept arriving with the wrong size or SHA-256."""


class JobEnded(LigoClientError):
    """The job reached a state other than the one waited for; ``job`` is its last JSON."""

    def __init__(self, message: str, job: dict):
        super().__init__(message)
        self.job = job


class JobFailed(JobEnded):
    pass


class JobCancelled(JobEnded):
    pass


class JobTimeout(JobEnded, TimeoutError):
    """The wait ran out of time; the job goes on running on the service."""
