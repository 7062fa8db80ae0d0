"""A session's live state in a generation replica: the story runner's `StorySession`.

Session shots are rendered by `StorySession.render_shot` - the very step batch renders use -
so memory, keyframe selection, MI2V/MM2V transitions, seeds and checkpoints are the batch
behaviour. Everything needed to reopen a session lives in storage (its RenderConfig and
reference images next to `session.json`, the runner's checkpoint under `story/`), so any
replica, restarted or not, reopens it where it stopped.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from pipelines.serve_errors import ServeRequestError
from pipelines.serve_sessions import SessionStore, new_session_id
from storymem_model import storage
from storymem_model.render_config import RenderConfig
from storymem_model.runner import (
    RenderError, StoryRunner, StorySession, image_png, images_sha256, png_image)
from storymem_model.story_script import ShotSpec

SESSION_STORY_ID = "session"


def _reference_uri(store: SessionStore, scope: str, session_id: str, index: int) -> str:
    return storage.join(store.session_uri(scope, session_id), "references", f"ref_{index:02d}.png")


def memory_view(session: StorySession) -> list[dict]:
    return [{"keyframe_id": e.keyframe_id, "scene": int(e.scene), "shot": int(e.shot),
             "frame_index": int(e.frame_index)} for e in session.bank.entries]


def shot_view(row: dict) -> dict:
    return {"scene": row["scene"], "shot": row["shot"], "shot_index": row["shot_index"],
            "prompt": row["prompt"], "cut": row["cut"], "mode": row["mode"],
            "seed": row["seed"], "num_frames": row["num_frames"],
            "video_uri": row["video_uri"], "video_sha256": row["video_sha256"],
            "memory_keyframe_ids": list(row["memory_keyframe_ids"]),
            "selected_keyframe_ids": list(row["keyframe_ids"])}


class LiveSession:
    """A reopened session plus the lock that keeps its shots in order on this replica."""

    def __init__(self, scope: str, session_id: str, story: StorySession):
        self.scope = scope
        self.session_id = session_id
        self.story = story
        self.lock = asyncio.Lock()
        self.broken = False  # set after a failed shot: reopen from storage before the next


def create_session(store: SessionStore, pipeline, scorers, base_config: RenderConfig,
                   scope: str, body: dict, references: list[np.ndarray]) -> tuple[dict, LiveSession]:
    """Write a new session (config, references, record) and open it. Runs in a thread."""
    session_id = new_session_id()
    # What `storymem render --seed S --transition T --references ...` would use.
    try:
        config = base_config.replace(seed=int(body.get("seed") or 0),
                                     transition=body.get("transition") or base_config.transition,
                                     references_sha256=images_sha256(references))
    except ValueError as exc:  # ConfigError: e.g. references on a --no-memory server
        raise ServeRequestError(422, "invalid_session_settings", str(exc)) from None
    for index, image in enumerate(references):
        storage.write_bytes(_reference_uri(store, scope, session_id, index), image_png(image))
    # The PNG round trip is lossless, so these are the pixels a reopened session sees.
    live = LiveSession(scope, session_id, _open_story(store, pipeline, scorers, config,
                                                      scope, session_id, references))
    record = {"session_id": session_id, "scope": scope, "name": body.get("name"),
              "created_at": time.time(), "seed": config.seed, "transition": config.transition,
              "config": config.to_dict(), "config_hash": config.config_hash(),
              "references": len(references), "shots": [], "memory": memory_view(live.story)}
    store.save(record)
    return record, live


def _open_story(store, pipeline, scorers, config, scope, session_id, references) -> StorySession:
    runner = StoryRunner(pipeline, scorers, config, references=references)
    out = store.story_out_uri(scope, session_id)
    return StorySession(runner, SESSION_STORY_ID, runner.story_uri(SESSION_STORY_ID, out),
                        story_name=SESSION_STORY_ID)


def open_session(store: SessionStore, pipeline, scorers, scope: str, session_id: str) -> LiveSession:
    """Reopen a stored session from its config, references and runner checkpoint."""
    record = store.get(scope, session_id)
    references = [png_image(storage.read_bytes(_reference_uri(store, scope, session_id, i)))
                  for i in range(int(record.get("references", 0)))]
    try:
        config = RenderConfig.from_dict(record["config"])
        story = _open_story(store, pipeline, scorers, config, scope, session_id, references)
    except (RenderError, ValueError) as exc:
        raise ServeRequestError(409, "session_incompatible",
                                f"session {session_id} cannot continue on this server: {exc}") from None
    if len(record["shots"]) != len(story.rows):
        # A replica died between a shot's checkpoint and its record: the checkpoint wins.
        record["shots"] = [shot_view(r) for r in story.rows]
        record["memory"] = memory_view(story)
        store.save(record)
    return LiveSession(scope, session_id, story)


def next_spec(story: StorySession, body: dict) -> ShotSpec:
    rows = story.rows
    if not rows:
        if not body.get("cut", True):
            raise ServeRequestError(422, "first_shot_not_a_cut",
                                    "the first shot of a session must be a cut (cut: true): "
                                    "there is no earlier shot to continue")
        scene, shot = 1, 1
    elif body.get("new_scene"):
        scene, shot = rows[-1]["scene"] + 1, 1
    else:
        scene, shot = rows[-1]["scene"], rows[-1]["shot"] + 1
    return ShotSpec(scene=scene, shot=shot, shot_index=len(rows), prompt=body["prompt"],
                    cut=bool(body.get("cut", True)),
                    first_frame_prompt=body.get("first_frame_prompt"))


def render_next_shot(store: SessionStore, live: LiveSession, body: dict) -> dict:
    """Render, checkpoint and record the session's next shot. Runs in a thread."""
    story = live.story
    spec = next_spec(story, body)
    row = story.render_shot(spec)
    try:
        record = store.get(live.scope, live.session_id)
    except ServeRequestError:
        # Deleted while the shot rendered: leave nothing behind.
        storage.remove(store.session_uri(live.scope, live.session_id))
        raise
    record["shots"] = [shot_view(r) for r in story.rows]
    record["memory"] = memory_view(story)
    store.save(record)
    return {"session_id": live.session_id, "shot": shot_view(row),
            "memory": record["memory"],
            "timings_s": {"generate": row["generate_seconds"], "select": row["select_seconds"],
                          "write": row["write_seconds"]}}


def is_current(store: SessionStore, live: LiveSession) -> bool:
    """False when storage has moved on (another replica added shots) or the session is gone."""
    try:
        record = store.get(live.scope, live.session_id)
    except ServeRequestError:
        return False
    return len(record["shots"]) == len(live.story.rows)
