"""Errors of the Serve endpoint and their JSON form `{"error": code, "detail": ...}`.

Every client mistake gets its own 4xx and its own `error` code; the server keeps serving.
A `ServeRequestError` raised in any deployment travels back to the ingress as itself: it
pickles with its status, code and extra fields, Ray wraps it in a `RayTaskError`, and the
ingress unwraps that wrapper in one place (`app.answer`), so the error's status and code
survive the hop. Subclasses: `LimitExceeded` (limits, quotas), `AuthError` (keys),
`ImageInputError` (request images).

Server faults never reach a client as raw exception text (it may hold paths, bucket names
or storage endpoints): the client gets `sanitised_failure(request_id)` - a fixed message
and the request id - and the detail goes to the log under that id (`log_failure`).
"""
from __future__ import annotations

import logging
import uuid


class ServeRequestError(Exception):
    """A client error with an HTTP status, a stable code and a message naming the problem;
    `extra` fields (e.g. `problems`, `limit`) go into the JSON body."""

    def __init__(self, status_code: int, code: str, detail: str, **extra):
        super().__init__(detail)
        self.status_code = int(status_code)
        self.code = code
        self.detail = detail
        self.extra = extra

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail, **self.extra}

    def __reduce__(self):
        # Exceptions pickle as `cls(*self.args)` by default, which loses status and code.
        return (_rebuild, (type(self), self.status_code, self.code, self.detail, self.extra))


def _rebuild(cls, status_code: int, code: str, detail: str, extra: dict):
    error = ServeRequestError.__new__(cls)
    ServeRequestError.__init__(error, status_code, code, detail, **extra)
    return error


def unknown_session(session_id: str) -> ServeRequestError:
    # Another key's session answers exactly like a missing one: ids are not confirmed.
    return ServeRequestError(404, "unknown_session",
                             f"no session {_shown_id(session_id)} for this API key")


def unknown_job(job_id: str) -> ServeRequestError:
    return ServeRequestError(404, "unknown_story_job",
                             f"no story job {_shown_id(job_id)} for this API key")


def _shown_id(value) -> str:
    """An id as echoed in a message: repr'd (no control characters) and cut short."""
    text = repr(value if isinstance(value, str) else str(value))
    return text if len(text) <= 60 else text[:57] + "...'"


# -- server faults ---------------------------------------------------------------------------
def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The Serve request id of the request being handled (the `x-request-id` Serve's proxy
    sends back), or a new id outside a request."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id
    except Exception:  # not inside a Serve request
        request_id = ""
    return request_id or new_request_id()


def sanitised_failure(request_id: str, what: str = "the request") -> str:
    """What a client is told about a server fault: no exception text, just the id."""
    return (f"{what} failed on the server; the details are in the server log under "
            f"request id {request_id}")


def log_failure(log: logging.Logger, request_id: str, what: str, exc: BaseException) -> None:
    """The full detail of a server fault, logged under its request id."""
    log.error("%s failed (request id %s): %s: %s", what, request_id, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))


def internal_error(request_id: str) -> ServeRequestError:
    return ServeRequestError(500, "internal_error", sanitised_failure(request_id),
                             request_id=request_id)
