"""Errors of the Serve endpoint and their JSON form `{"error": code, "detail": ...}`.

Every client mistake gets its own 4xx and its own `error` code; the server keeps serving.
Errors raised inside another deployment travel back to the ingress as plain dicts
(`as_payload` / `from_payload`), so their status and code survive the Ray hop.
"""
from __future__ import annotations


class ServeRequestError(Exception):
    """A client error with an HTTP status, a stable code and a message naming the problem."""

    def __init__(self, status_code: int, code: str, detail: str, **extra):
        super().__init__(detail)
        self.status_code = int(status_code)
        self.code = code
        self.detail = detail
        self.extra = extra

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail, **self.extra}

    def as_payload(self) -> dict:
        return {"__serve_error__": {"status_code": self.status_code, **self.body()}}

    @staticmethod
    def from_payload(result):
        """Raise the error carried by a deployment's result, or return the result."""
        if isinstance(result, dict) and "__serve_error__" in result:
            data = dict(result["__serve_error__"])
            raise ServeRequestError(data.pop("status_code"), data.pop("error"),
                                    data.pop("detail"), **data)
        return result


def unknown_session(session_id: str) -> ServeRequestError:
    # Another key's session answers exactly like a missing one: ids are not confirmed.
    return ServeRequestError(404, "unknown_session",
                             f"no session {session_id!r} for this API key")


def unknown_job(job_id: str) -> ServeRequestError:
    return ServeRequestError(404, "unknown_story_job", f"no story job {job_id!r} for this API key")
