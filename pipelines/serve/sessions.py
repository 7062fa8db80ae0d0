"""Interactive story sessions: their records in storage, scoped to an API key.

A session is a story built one shot at a time. Its pixels and memory live in the story
runner's own output layout (the same files a batch render writes, memory bank checkpoint
included), so a restarted or different replica continues the session exactly where it
stopped. Next to it, `session.json` holds a `SessionRecord`: the session's RenderConfig,
its shots (the runner's `ShotRecord`s) and its current memory; it is rewritten after each
shot and is what `GET /v1/sessions/{id}` reports.

Layout under the server's storage root:
    sessions/{scope}/{session_id}/session.json
    sessions/{scope}/{session_id}/shot-lease.json  while a shot of the session renders
    sessions/{scope}/{session_id}/references/ref_{i:02d}.png
    sessions/{scope}/{session_id}/story/{story_id}/{config_hash}/...   (runner layout)

Session ids are 192 random bits (`secrets.token_urlsafe(24)`), checked against a strict
pattern (a full match) before they touch a storage key, and looked up only under the caller's own scope:
another key's session is indistinguishable from a missing one.
"""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field

from pipelines.serve.errors import unknown_session
from pipelines.serve.limits import MAX_RECORD_BYTES
from storymem_model import storage
from storymem_model.records import ShotRecord
from storymem_model.render_config import RenderConfig

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}")  # used with fullmatch


def is_session_id(value) -> bool:
    return isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value) is not None


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class MemoryEntry:
    """One entry of a session's current memory (a keyframe or a reference image)."""

    keyframe_id: str
    scene: int
    shot: int
    frame_index: int

    @classmethod
    def of(cls, entry) -> "MemoryEntry":
        """From a memory bank's `KeyframeEntry`."""
        return cls(entry.keyframe_id, int(entry.scene), int(entry.shot),
                   int(entry.frame_index))


@dataclass
class SessionRecord:
    """A session as stored: its settings, its shots so far and its current memory."""

    session_id: str
    scope: str
    config: RenderConfig  # the session's RenderConfig (seed, transition, references)
    name: str | None = None
    references: int = 0  # reference images stored under references/
    shots: list[ShotRecord] = field(default_factory=list)
    memory: list[MemoryEntry] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    stored_bytes: int = 0  # bytes of the session's files, this record's JSON included

    def bytes_besides_record(self) -> int:
        """Bytes of the session's files other than `session.json`; for the record as it
        was read (`stored_bytes` counts the record's own JSON too)."""
        return self.stored_bytes - len(self.to_json())

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()

    def to_json(self) -> bytes:
        return json.dumps({
            "session_id": self.session_id, "scope": self.scope, "name": self.name,
            "config": self.config.to_dict(), "references": self.references,
            "shots": [r.to_row() for r in self.shots],
            "memory": [vars(m) for m in self.memory],
            "created_at": self.created_at, "updated_at": self.updated_at,
            "stored_bytes": self.stored_bytes,
        }, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "SessionRecord":
        raw = json.loads(data)
        return cls(session_id=raw["session_id"], scope=raw["scope"], name=raw["name"],
                   config=RenderConfig.from_dict(raw["config"]),
                   references=int(raw["references"]),
                   shots=[ShotRecord.from_row(r) for r in raw["shots"]],
                   memory=[MemoryEntry(**m) for m in raw["memory"]],
                   created_at=raw["created_at"], updated_at=raw["updated_at"],
                   stored_bytes=int(raw.get("stored_bytes", 0)))


class SessionStore:
    """Session records under `{root}/sessions/`."""

    def __init__(self, root: str):
        self.root = storage.join(root, "sessions")

    def session_uri(self, scope: str, session_id: str) -> str:
        return storage.join(self.root, scope, session_id)

    def story_out_uri(self, scope: str, session_id: str) -> str:
        """The runner's output root for this session."""
        return storage.join(self.session_uri(scope, session_id), "story")

    def reference_uri(self, scope: str, session_id: str, index: int) -> str:
        return storage.join(self.session_uri(scope, session_id), "references",
                            f"ref_{index:02d}.png")

    def shot_lease_uri(self, scope: str, session_id: str) -> str:
        """The lease held while one of the session's shots renders (one at a time)."""
        return storage.join(self.session_uri(scope, session_id), "shot-lease.json")

    def _record_uri(self, scope: str, session_id: str) -> str:
        return storage.join(self.session_uri(scope, session_id), "session.json")

    def save(self, record: SessionRecord, other_bytes: int) -> None:
        """Write `record`, its `stored_bytes` set to `other_bytes` (the session's other
        files) plus the size of the JSON written, which holds that count itself."""
        record.updated_at = time.time()
        record.stored_bytes = other_bytes
        data = record.to_json()
        while record.stored_bytes != other_bytes + len(data):  # settles in a step or two
            record.stored_bytes = other_bytes + len(data)
            data = record.to_json()
        storage.write_bytes(self._record_uri(record.scope, record.session_id), data)

    def exists(self, scope: str, session_id: str) -> bool:
        """Whether this key has such a session (its record is there), without reading it."""
        if not is_session_id(session_id):
            return False
        fs, path = storage.filesystem(self._record_uri(scope, session_id))
        if hasattr(fs, "invalidate_cache"):  # another replica may have deleted it
            fs.invalidate_cache(path)
        return fs.exists(path)

    def get(self, scope: str, session_id: str) -> SessionRecord:
        """The session's record; `ServeRequestError` 404 when this key has no such session."""
        if not is_session_id(session_id):
            raise unknown_session(session_id)
        try:
            data = storage.read_bytes(self._record_uri(scope, session_id),
                                      max_bytes=MAX_RECORD_BYTES)
        except FileNotFoundError:
            raise unknown_session(session_id) from None
        return SessionRecord.from_json(data)

    def delete(self, scope: str, session_id: str) -> SessionRecord:
        """Remove the session (404 for unknown / foreign ids); returns its last record."""
        record = self.get(scope, session_id)
        # The record goes first: from then on the session is gone for every replica.
        storage.remove(self._record_uri(scope, session_id))
        storage.remove(self.session_uri(scope, session_id))
        return record
