"""The request guard inside Serve's HTTP proxy, ahead of the proxy's own body buffering.

Serve's proxy reads a request's body into an unbounded in-memory queue while it waits for
an ingress replica to take the request (`ProxyActor.proxy_asgi_receive`). Measured on
127.0.0.1 with the ingress stalled: one unauthenticated 256 MiB POST grew the proxy by
~256 MiB - the ingress's own checks come too late. So the same `RequestGuard` also runs in
the proxy, as a proxy middleware (Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
hook): an unauthenticated `/v1` request is answered 401/403 before its body is read, and a
body is never buffered past its size limit (`max_script_bytes` for `POST /v1/stories`,
`max_body_bytes` otherwise) or its JSON bounds.

`proxy_env(settings)` is the environment the Serve controller is started with (`storymem
serve` passes it as `controller_options.runtime_env.env_vars`); proxies the controller
starts inherit it. It carries the key digests (never keys; the replicas receive them too)
and the limits. A proxy started without it (Serve already running in the cluster when
`storymem serve` started) has no guard; `storymem serve` detects that and says so.
"""
from __future__ import annotations

import json
import os

from pipelines.serve.auth import ApiKeyChecker
from pipelines.serve.limits import ServeLimits
from pipelines.serve.request_guard import GuardConfig, RequestGuard

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
GUARD_ENV = "STORYMEM_PROXY_GUARD"
CALLBACK = "pipelines.serve.proxy_guard.proxy_middlewares"
GUARD_HEADER = b"x-storymem-guard"


def proxy_env(settings) -> dict[str, str]:
    """Environment variables that make Serve's proxies run the guard for `settings`."""
    return {CALLBACK_ENV: CALLBACK,
            GUARD_ENV: json.dumps({"key_digests": list(settings.key_digests),
                                   "limits": settings.limits.to_dict()}, sort_keys=True)}


def guard_config_from_env(environ=None) -> GuardConfig:
    environ = os.environ if environ is None else environ
    raw = environ.get(GUARD_ENV)
    if not raw:
        raise RuntimeError(f"{GUARD_ENV} is not set: the proxy guard has no keys or limits")
    data = json.loads(raw)
    return GuardConfig(ApiKeyChecker(list(data["key_digests"])),
                       ServeLimits.from_dict(data["limits"]))


def proxy_middlewares():
    """The proxy callback: Serve calls it in each proxy process at start."""
    from starlette.middleware import Middleware

    config = guard_config_from_env()
    return [Middleware(RequestGuard, config=lambda: config,
                       own_headers=[(GUARD_HEADER, b"proxy")])]
