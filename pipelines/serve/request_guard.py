"""ASGI middleware run before any route: API key check and request body bounds.

It runs ahead of body parsing - in Serve's HTTP proxy (`proxy_guard`) and again in the
ingress replica - so:

- an unauthenticated `/v1` request gets 401/403 before a byte of its body is read, even
  when the body is malformed or huge;
- a body over its size limit is refused (413 naming the limit) by its `Content-Length`, or,
  for chunked uploads, as soon as the bytes read pass the limit: `max_script_bytes` (1 MB)
  for `POST /v1/stories`, `max_body_bytes` for every other `/v1` route, 1 MiB at most
  elsewhere (health, docs);
- a JSON body nested deeper than `max_json_depth` or with more than `max_json_tokens`
  structural characters is refused (422 naming the limit) while it streams in
  (`json_meter`), before anything parses it.

A refusal before the body was read whole closes the connection (`Connection: close`), so
the server does not go on reading what the client still sends. Paths under `/v1` need a
key; the caller's scope is put into `request.state.caller` for the routes. The key itself
is never stored, logged or echoed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines.serve.auth import ApiKeyChecker, AuthError
from pipelines.serve.json_meter import JsonMeter
from pipelines.serve.limits import LimitExceeded, ServeLimits

PROTECTED_PREFIX = "/v1"
STORIES_PATH = "/v1/stories"
UNPROTECTED_MAX_BODY_BYTES = 1024 * 1024
_CLOSE = [(b"connection", b"close")]


@dataclass(frozen=True)
class GuardConfig:
    checker: ApiKeyChecker | None
    limits: ServeLimits


def body_limit(path: str, method: str, limits: ServeLimits) -> tuple[str, int]:
    """(limit name, maximum) for the body of a request to `path`."""
    if path.rstrip("/") == STORIES_PATH and method == "POST":
        return "max_script_bytes", limits.max_script_bytes
    if is_protected(path):
        return "max_body_bytes", limits.max_body_bytes
    return "max_body_bytes", min(limits.max_body_bytes, UNPROTECTED_MAX_BODY_BYTES)


def is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """Pure ASGI middleware; `config()` returns the `GuardConfig` lazily (None while the
    replica is starting), because a Serve replica configures it after the app is built.
    `own_headers` are added to the answers the guard gives itself (the proxy marks them)."""

    def __init__(self, app, config, own_headers=()):
        self.app = app
        self.config = config
        self.close = list(own_headers) + _CLOSE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        config = self.config()
        if config is None:
            if is_protected(path):
                return await send_json(send, 503, {"error": "not_ready",
                                                   "detail": "server is starting"}, self.close)
            config = GuardConfig(None, ServeLimits())
        headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
        if is_protected(path):
            raw = headers.get(b"authorization")
            try:
                caller = config.checker.authenticate(raw.decode("latin-1") if raw else None)
            except AuthError as exc:
                extra = [(b"www-authenticate", b"Bearer")] if exc.status_code == 401 else []
                return await send_json(send, exc.status_code, exc.body(), extra + self.close)
            scope.setdefault("state", {})["caller"] = caller
        limit, maximum = body_limit(path, scope.get("method", "GET"), config.limits)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                return await send_json(send, 400, {"error": "bad_content_length",
                                                   "detail": "Content-Length is not a number"},
                                       self.close)
            if declared_bytes > maximum:
                exc = LimitExceeded(limit, maximum, declared_bytes, "request body size in bytes")
                return await send_json(send, exc.status_code, exc.body(), self.close)
        body = _BoundedBody(receive, send, limit, maximum, config.limits, self.close)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.refused:
                raise
            # The app met the disconnect the guard gave it after refusing the body (e.g.
            # starlette's ClientDisconnect); the refusal has been sent.


class _BoundedBody:
    """The `receive` of a request whose body is counted and metered as it arrives. Once a
    bound is passed, the refusal is sent right away, the app is told the client left
    (`http.disconnect`) and whatever the app still sends is dropped."""

    def __init__(self, receive, send, limit: str, maximum: int, limits: ServeLimits,
                 close_headers: list):
        self._receive = receive
        self._close = close_headers
        self._send = send
        self.limit = limit
        self.maximum = maximum
        self.received = 0
        self.meter = JsonMeter(limits.max_json_depth, limits.max_json_tokens)
        self.refused = False
        self.started = False

    async def send(self, message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        chunk = message.get("body", b"")
        self.received += len(chunk)
        try:
            if self.received > self.maximum:
                raise LimitExceeded(self.limit, self.maximum, f">{self.maximum}",
                                    "request body size in bytes")
            self.meter.feed(chunk)
        except LimitExceeded as exc:
            self.refused = True
            if not self.started:
                await send_json(self._send, exc.status_code, exc.body(), self._close)
            return {"type": "http.disconnect"}
        return message
