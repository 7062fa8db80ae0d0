"""ASGI middleware run before any route: API key check and request body size limit.

It runs ahead of FastAPI's body parsing, so an unauthenticated caller gets 401/403 even when
its body is malformed or huge, and an oversized body is refused (413, naming
`max_body_bytes`) by its `Content-Length` or, for chunked uploads, as soon as the bytes read
pass the limit - the body is never buffered whole. Paths under `/v1` need a key; the caller's
scope is put into `request.state.caller` for the routes. The key itself is never stored,
logged or echoed.
"""
from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from pipelines.serve.auth import AuthError
from pipelines.serve.limits import LimitExceeded

PROTECTED_PREFIX = "/v1"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the limit. FastAPI re-raises
    HTTPExceptions met while reading a body, so the app's handler answers 413 with `body`."""

    def __init__(self, max_body_bytes: int):
        limit = LimitExceeded("max_body_bytes", max_body_bytes, f">{max_body_bytes}",
                              "request body size in bytes")
        super().__init__(status_code=limit.status_code, detail=limit.detail)
        self.body = limit.body()


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """Pure ASGI middleware; `settings()` returns (ApiKeyChecker, max_body_bytes) lazily,
    because the Serve replica configures them after the app object is built."""

    def __init__(self, app, settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        checker, max_body_bytes = self.settings()
        path = scope.get("path", "")
        if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
            if checker is None:
                return await _send_json(send, 503, {"error": "not_ready",
                                                    "detail": "server is starting"})
            headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
            raw = headers.get(b"authorization")
            try:
                caller = checker.authenticate(raw.decode("latin-1") if raw else None)
            except AuthError as exc:
                extra = [(b"www-authenticate", b"Bearer")] if exc.status_code == 401 else []
                return await _send_json(send, exc.status_code, exc.body(), extra)
            scope.setdefault("state", {})["caller"] = caller
            declared = headers.get(b"content-length")
            if declared is not None:
                try:
                    declared_bytes = int(declared)
                except ValueError:
                    return await _send_json(send, 400, {"error": "bad_content_length",
                                                        "detail": "Content-Length is not a number"})
                if declared_bytes > max_body_bytes:
                    exc = LimitExceeded("max_body_bytes", max_body_bytes, declared_bytes,
                                        "request body size in bytes")
                    return await _send_json(send, exc.status_code, exc.body())
        else:
            # Unprotected paths (health, docs) never need a body.
            max_body_bytes = min(max_body_bytes, 1024 * 1024)

        received = 0
        response_started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body_bytes:
                    raise BodyTooLarge(max_body_bytes)
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not response_started:
                await _send_json(send, exc.status_code, exc.body)
