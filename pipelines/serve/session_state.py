"""A session's live state in a generation replica: the story runner's `StorySession`.

Session shots are rendered by `StorySession.render_shot` - the very step batch renders use -
so memory, keyframe selection, MI2V/MM2V transitions, seeds and checkpoints are the batch
behaviour. A session's RenderConfig is the server's (`storymem render` with the same
flags) with the session's seed, transition and reference images: the config
`storymem render --seed S --transition T --references ...` builds, so the config hash and
every byte are the same. Everything needed to reopen a session lives in storage (its
RenderConfig in `session.json`, its reference images, the runner's checkpoint under
`story/`), so any replica, restarted or not, reopens it where it stopped.

One shot at a time per session, across replicas: a shot is rendered only while its replica
holds the session's shot lease (`shot_lease`, a storage lease renewed while the shot
renders). A second shot request meeting a held lease - another replica, or this one after
its cached session was evicted - is refused with 409 `session_busy` before it renders or
writes anything. The session's shot count (`max_session_shots`) is checked while the lease
is held, on the record read under it, so shots queued behind each other can never pass it.
A replica that stalls past its lease (another replica took it over meanwhile) learns it
before it writes: the lease is renewed - a compare-and-swap in storage - after the shot is
generated and before its files are written, and again before the session record is
written; a lost lease answers 409 `session_busy` with nothing written.
Sessions count against the key's `max_sessions_per_key` quota and their bytes against
`max_stored_bytes_per_key` (`usage`): a session's `stored_bytes` grows by the size of what
each request wrote (a shot's own files, its memory checkpoint replacing the previous one,
the rewritten `session.json`), never by listing the session's folder.
"""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np

from pipelines.serve.errors import ServeRequestError, unknown_session
from pipelines.serve.limits import MAX_STORED_IMAGE_BYTES, MAX_STORED_VIDEO_BYTES, ServeLimits
from pipelines.serve.schemas import SessionCreate, SessionShotRequest
from pipelines.serve.sessions import (MemoryEntry, SessionRecord, SessionStore,
                                      new_session_id)
from pipelines.serve.usage import UsageIndex, files_bytes, folder_bytes
from storymem_model import output_layout as layout
from storymem_model import storage
from storymem_model.leases import Lease, LeaseLostError
from storymem_model.images import image_png, images_sha256, png_image
from storymem_model.records import ShotRecord
from storymem_model.render_config import RenderConfig
from storymem_model.runner import RenderError, StoryRunner, StorySession
from storymem_model.story_script import ShotSpec

SESSION_STORY_ID = "session"


class PresetConfigs:
    """The server's RenderConfig for each sampling preset a request may name (standard,
    fast); its own preset's config is the spec's. Built once per replica, no file read."""

    def __init__(self, render):
        from storymem_model.render_config import SAMPLING_PRESETS
        from storymem_model.render_spec import with_sampling_preset

        self.default = render.config
        self._by_preset = {preset: with_sampling_preset(render, preset)
                           for preset in SAMPLING_PRESETS}

    def config(self, preset: str | None) -> RenderConfig:
        return self.default if preset is None else self._by_preset[preset]


def story_config(base: RenderConfig, seed: int | None = None, transition: str | None = None,
                 **changes) -> RenderConfig:
    """The server's config with a story's seed and transition, as `storymem render --seed
    --transition` would build it (without memory the transition is always "none")."""
    if seed is not None:
        changes["seed"] = int(seed)
    if transition is not None and base.memory:
        changes["transition"] = transition
    return base.replace(**changes) if changes else base


@dataclass
class LiveSession:
    """A reopened session plus the lock that keeps its shots in order on this replica."""

    scope: str
    session_id: str
    story: StorySession
    lock: asyncio.Lock
    broken: bool = False  # set after a failed shot: reopen from storage before the next

    @classmethod
    def of(cls, scope: str, session_id: str, story: StorySession) -> "LiveSession":
        return cls(scope, session_id, story, asyncio.Lock())


@dataclass(frozen=True)
class SessionShotResult:
    """What a session shot returns across the Ray hop: the session after the shot, the
    shot's record and (when asked for) its video."""

    record: SessionRecord
    shot: ShotRecord
    video_base64: str | None = None


def memory_of(story: StorySession) -> list[MemoryEntry]:
    return [MemoryEntry.of(e) for e in story.bank.entries]


def session_busy(session_id: str) -> ServeRequestError:
    return ServeRequestError(409, "session_busy",
                             "another shot of this session is rendering (one shot at a time "
                             "per session); send the next shot when it has finished")


def shot_lease(store: SessionStore, scope: str, session_id: str, owner: str,
               ttl_s: float) -> Lease:
    """The session's shot lease (not yet taken: `try_acquire()` it)."""
    return Lease(store.shot_lease_uri(scope, session_id), owner=owner, ttl_s=ttl_s)


def create_session(store: SessionStore, usage: UsageIndex, limits: ServeLimits, pipeline,
                   scorers, base_configs: PresetConfigs, scope: str, body: SessionCreate,
                   references: list[np.ndarray]) -> SessionRecord:
    """Admit (quotas), write (config, references, record) and open a new session. Runs in
    a thread."""
    session_id = new_session_id()
    try:
        config = story_config(base_configs.config(body.sampling_preset), body.seed,
                              body.transition,
                              references_sha256=images_sha256(references))
    except ValueError as exc:  # ConfigError: e.g. references on a --no-memory server
        raise ServeRequestError(422, "invalid_session_settings", str(exc)) from None
    usage.admit_session(scope, session_id, limits)  # 429 quota_exceeded
    try:
        written = 0
        for index, image in enumerate(references):
            png = image_png(image)
            storage.write_bytes(store.reference_uri(scope, session_id, index), png)
            written += len(png)
        # The PNG round trip is lossless, so these are the pixels a reopened session sees.
        story = _open_story(store, pipeline, scorers, config, scope, session_id, references)
        record = SessionRecord(session_id=session_id, scope=scope, config=config,
                               name=body.name, references=len(references),
                               memory=memory_of(story))
        store.save(record, other_bytes=written)
    except BaseException:
        storage.remove(store.session_uri(scope, session_id))
        usage.end_session(scope, session_id)
        raise
    usage.add_bytes(scope, record.stored_bytes)
    return record


def _open_story(store, pipeline, scorers, config, scope, session_id, references) -> StorySession:
    runner = StoryRunner(pipeline, scorers, config, references=references)
    out = store.story_out_uri(scope, session_id)
    return StorySession(runner, SESSION_STORY_ID, runner.story_uri(SESSION_STORY_ID, out),
                        story_name=SESSION_STORY_ID)


def open_session(store: SessionStore, pipeline, scorers, scope: str, session_id: str) -> LiveSession:
    """Reopen a stored session from its config, references and runner checkpoint."""
    record = store.get(scope, session_id)
    return LiveSession.of(scope, session_id, reopen_story(store, pipeline, scorers, record))


def reopen_story(store: SessionStore, pipeline, scorers, record: SessionRecord) -> StorySession:
    """The session's story from its config, references and runner checkpoint; `record` is
    brought up to the checkpoint (and saved) when they disagree."""
    scope, session_id = record.scope, record.session_id
    references = [png_image(storage.read_bytes(store.reference_uri(scope, session_id, i),
                                               max_bytes=MAX_STORED_IMAGE_BYTES))
                  for i in range(record.references)]
    try:
        story = _open_story(store, pipeline, scorers, record.config, scope, session_id,
                            references)
    except (RenderError, ValueError) as exc:
        raise ServeRequestError(409, "session_incompatible",
                                f"session {session_id} cannot continue on this server: {exc}") from None
    if len(record.shots) != len(story.rows):
        # A replica died between a shot's checkpoint and its record: the checkpoint wins
        # (that shot's files are counted by the next retention sweep).
        other = record.bytes_besides_record()
        record.shots, record.memory = list(story.rows), memory_of(story)
        store.save(record, other_bytes=other)
    return story


def next_spec(story: StorySession, body: SessionShotRequest) -> ShotSpec:
    rows = story.rows
    if not rows:
        if not body.cut:
            raise ServeRequestError(422, "first_shot_not_a_cut",
                                    "the first shot of a session must be a cut (cut: true): "
                                    "there is no earlier shot to continue")
        scene, shot = 1, 1
    elif body.new_scene:
        scene, shot = rows[-1].scene + 1, 1
    else:
        scene, shot = rows[-1].scene, rows[-1].shot + 1
    return ShotSpec(scene=scene, shot=shot, shot_index=len(rows), prompt=body.prompt,
                    cut=body.cut, first_frame_prompt=body.first_frame_prompt)


def shot_files(row: ShotRecord) -> list[str]:
    """The story-folder keys a session shot wrote besides its memory checkpoint: its video,
    keyframes and record, and with the first shot the story's config."""
    keys = [row.video_key, *(layout.keyframe_key(k) for k in row.keyframe_ids),
            layout.shot_record_key(row.scene, row.shot)]
    if row.shot_index == 0:
        keys.append(layout.CONFIG_FILE)
    return keys


def render_next_shot(store: SessionStore, usage: UsageIndex, live: LiveSession,
                     record: SessionRecord, body: SessionShotRequest,
                     lease: Lease) -> SessionShotResult:
    """Render, checkpoint and record the session's next shot, holding the session's shot
    lease (`lease`); `record` is the session as read under that lease. Runs in a thread."""
    story = live.story
    memory_uri = storage.join(story.story_uri, layout.MEMORY_DIR)
    memory_before = folder_bytes(memory_uri)  # the latest checkpoint: bounded in size

    def still_held() -> None:
        """Renew the lease now (a compare-and-swap on it): raises 409 `session_busy` when
        this replica stalled past it and another took it over - before this replica
        writes anything, so the other holder's shot is never overwritten."""
        try:
            lease.renew()
        except LeaseLostError:
            raise session_busy(live.session_id) from None

    shot = story.render_shot(next_spec(story, body), before_write=still_held)
    still_held()  # the session record too is written only while the lease is held
    if not store.exists(live.scope, live.session_id):
        # Deleted while the shot rendered: leave nothing behind.
        storage.remove(store.session_uri(live.scope, live.session_id))
        raise unknown_session(live.session_id)
    written = files_bytes([storage.join(story.story_uri, key) for key in shot_files(shot)])
    written += folder_bytes(memory_uri) - memory_before  # its checkpoint less the one replaced
    before, other = record.stored_bytes, record.bytes_besides_record()
    record.shots, record.memory = list(story.rows), memory_of(story)
    store.save(record, other_bytes=other + written)
    usage.add_bytes(live.scope, record.stored_bytes - before)
    video = None
    if body.return_video in ("base64", "both"):
        video = base64.b64encode(storage.read_bytes(
            shot.video_uri, max_bytes=MAX_STORED_VIDEO_BYTES)).decode("ascii")
    return SessionShotResult(record, shot, video)


def exclusive_session_shot(store: SessionStore, usage: UsageIndex, limits: ServeLimits,
                           pipeline, scorers, live: LiveSession, body: SessionShotRequest,
                           owner: str, lease_ttl_s: float) -> SessionShotResult:
    """The session's next shot, rendered only while holding its shot lease: 409
    `session_busy`, with nothing rendered or written, when another shot of the session is
    rendering anywhere. The session's record is read once, under the lease: 404 once the
    session is gone, 422 `max_session_shots` when the shot would be one too many.
    Reopens the session from storage first when storage has moved on (another replica
    rendered shots) or the last shot here failed. Runs in a thread."""
    lease = shot_lease(store, live.scope, live.session_id, owner, lease_ttl_s)
    if not lease.try_acquire():
        raise session_busy(live.session_id)
    try:
        record = store.get(live.scope, live.session_id)
        if live.broken or len(record.shots) != len(live.story.rows):
            live.story = reopen_story(store, pipeline, scorers, record)
            live.broken = False
        limits.check("max_session_shots", len(record.shots) + 1, "shots in this session")
        try:
            return render_next_shot(store, usage, live, record, body, lease)
        except ServeRequestError as exc:
            if exc.code == "session_busy":
                live.broken = True  # lost the lease mid-shot: reload before the next one
            raise  # otherwise refused before any state changed
        except Exception:
            live.broken = True  # the in-memory state may be half updated
            raise
    finally:
        lease.release()
