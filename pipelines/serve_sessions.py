"""Interactive story sessions: their records in storage, scoped to an API key.

A session is a story built one shot at a time. Its pixels and memory live in the story
runner's own output layout (the same files a batch render writes, memory bank checkpoint
included), so a restarted or different replica continues the session exactly where it
stopped. Next to it, `session.json` holds what the API reports (settings, shots, current
memory) and is rewritten after each shot.

Layout under the server's storage root:
    sessions/{scope}/{session_id}/session.json
    sessions/{scope}/{session_id}/story/{story_id}/{config_hash}/...   (runner layout)

Session ids are 192 random bits (`secrets.token_urlsafe(24)`), checked against a strict
pattern before they touch a storage key, and looked up only under the caller's own scope:
another key's session is indistinguishable from a missing one.
"""
from __future__ import annotations

import json
import re
import secrets
import time

from pipelines.serve_errors import unknown_session
from storymem_model import storage

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{32}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


class SessionStore:
    """Session records under `{root}/sessions/`."""

    def __init__(self, root: str):
        self.root = storage.join(root, "sessions")

    def session_uri(self, scope: str, session_id: str) -> str:
        return storage.join(self.root, scope, session_id)

    def story_out_uri(self, scope: str, session_id: str) -> str:
        """The runner's output root for this session."""
        return storage.join(self.session_uri(scope, session_id), "story")

    def _record_uri(self, scope: str, session_id: str) -> str:
        return storage.join(self.session_uri(scope, session_id), "session.json")

    def save(self, record: dict) -> None:
        record["updated_at"] = time.time()
        storage.write_bytes(self._record_uri(record["scope"], record["session_id"]),
                            json.dumps(record, sort_keys=True).encode("utf-8"))

    def get(self, scope: str, session_id: str) -> dict:
        """The session's record; `ServeRequestError` 404 when this key has no such session."""
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.match(session_id):
            raise unknown_session(session_id)
        try:
            data = storage.read_bytes(self._record_uri(scope, session_id))
        except FileNotFoundError:
            raise unknown_session(session_id) from None
        return json.loads(data)

    def delete(self, scope: str, session_id: str) -> None:
        self.get(scope, session_id)  # 404 for unknown / foreign ids
        # The record goes first: from then on the session is gone for every replica.
        storage.remove(self._record_uri(scope, session_id))
        storage.remove(self.session_uri(scope, session_id))

    def count(self, scope: str) -> int:
        fs, path = storage.filesystem(storage.join(self.root, scope, "*", "session.json"))
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        return len(fs.glob(path))


def public_view(record: dict) -> dict:
    """The record as `SessionOut` (no scope, no internal config)."""
    return {key: record[key] for key in ("session_id", "name", "created_at", "seed",
                                         "transition", "config_hash", "shots", "memory")}
