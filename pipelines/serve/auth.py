"""API keys for the Serve endpoint: loading, checking, and the scope a key owns.

Keys come from the `STORYMEM_API_KEYS` environment variable (comma-separated) and/or a key
file (one key per line, `#` comments and blank lines ignored). Only SHA-256 digests of the
keys are kept after loading: the digests travel to the Serve replicas (deployment arguments
are visible in Ray's state API), the raw keys never do, and no key is ever logged.

Every `/v1` request presents `Authorization: Bearer <key>`:
- no header, another scheme or an empty token -> 401 (with `WWW-Authenticate: Bearer`);
- a well-formed token that is not a known key -> 403.
A known key is identified by its *scope*: a short, stable, non-reversible id derived from the
digest. Sessions, shots and story jobs are stored under their key's scope and only that
scope can see them.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.serve.errors import ServeRequestError

API_KEYS_ENV = "STORYMEM_API_KEYS"
API_KEY_FILE_ENV = "STORYMEM_API_KEY_FILE"
MIN_KEY_LENGTH = 16


class ApiKeyConfigError(ValueError):
    """The server cannot start: no usable API keys (the message never contains a key)."""


class AuthError(ServeRequestError):
    """A request that is not authenticated (401) or not authorised (403)."""


def key_digest(key: str) -> str:
    """Hex SHA-256 of a key; the only form in which a key is stored or passed on."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def scope_of_digest(digest: str) -> str:
    """The id of the namespace a key owns (storage prefix, session owner)."""
    return hashlib.sha256(f"storymem-scope:{digest}".encode()).hexdigest()[:24]


def _parse_keys(text: str, separator: str, source: str) -> list[str]:
    keys = []
    for number, raw in enumerate(text.split(separator), start=1):
        key = raw.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_LENGTH:
            raise ApiKeyConfigError(
                f"{source}: key #{number} is shorter than {MIN_KEY_LENGTH} characters "
                "(use long random keys, e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)")
        if any(ch.isspace() for ch in key):
            raise ApiKeyConfigError(f"{source}: key #{number} contains whitespace")
        keys.append(key)
    return keys


def load_key_digests(key_file: str | os.PathLike | None = None,
                     environ: dict | None = None) -> list[str]:
    """Digests of every configured key, from the env variable and/or `key_file`.

    `key_file` defaults to `$STORYMEM_API_KEY_FILE`. Raises `ApiKeyConfigError` when no
    key is configured at all (the server refuses to start open to everyone).
    """
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    env_value = environ.get(API_KEYS_ENV, "")
    if env_value.strip():
        keys += _parse_keys(env_value, ",", API_KEYS_ENV)
    key_file = key_file or environ.get(API_KEY_FILE_ENV) or None
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ApiKeyConfigError(f"cannot read API key file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ApiKeyConfigError(f"API key file {path} is not UTF-8 text") from None
        keys += _parse_keys(text, "\n", f"key file {path}")
    if not keys:
        raise ApiKeyConfigError(
            f"no API keys configured: set {API_KEYS_ENV} (comma-separated) or pass a key "
            f"file (--api-key-file or {API_KEY_FILE_ENV})")
    return sorted(set(key_digest(k) for k in keys))


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: only the scope is known, never the key."""

    scope: str


class ApiKeyChecker:
    """Checks `Authorization` headers against a set of key digests."""

    def __init__(self, digests: list[str]):
        if not digests:
            raise ApiKeyConfigError("ApiKeyChecker needs at least one key digest")
        self._digests = [bytes.fromhex(d) for d in digests]

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization or not authorization.strip():
            raise AuthError(401, "missing_api_key",
                            "missing API key: send `Authorization: Bearer <key>`")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "malformed_authorization",
                            "malformed Authorization header: expected `Bearer <key>`")
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        # Compare against every digest so the time taken does not depend on which matched.
        matched = None
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                matched = digest
        if matched is None:
            raise AuthError(403, "invalid_api_key", "API key not accepted")
        return Caller(scope=scope_of_digest(matched.hex()))
