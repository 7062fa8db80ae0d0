"""Errors of the Serve endpoint and their JSON form `{"error": code, "detail": ...}`.

Every client mistake gets its own 4xx and its own `error` code; the server keeps serving.
A `ServeRequestError` raised in any deployment travels back to the ingress as itself: it
pickles with its status, code and extra fields, Ray wraps it in a `RayTaskError`, and the
ingress unwraps that wrapper in one place (`app.answer`), so the error's status and code
survive the hop. Subclasses: `LimitExceeded` (limits), `AuthError` (keys),
`ImageInputError` (request images).
"""
from __future__ import annotations


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
                             f"no session {session_id!r} for this API key")


def unknown_job(job_id: str) -> ServeRequestError:
    return ServeRequestError(404, "unknown_story_job", f"no story job {job_id!r} for this API key")
