"""The story runner: renders a whole script shot by shot, checkpointing after every shot.

Per shot: take the memory -> generate (T2V or MR2V for the first shot, then M2V; MI2V or
MM2V for shots with ``cut: false`` as ``config.transition`` says) -> embed and score every
frame once -> select keyframes -> write the shot's files -> update the memory bank and
write it -> write the shot's record (its checkpoint): `ShotStep.render`. After the last
shot: stitch the story video, write ``shots.parquet`` and finally ``_COMMITTED.json``. The layout is in
``storymem_model/output_layout.py`` and the README.

Without memory (``config.memory`` False, the "independent shots" baseline) every shot is
generated on its own: T2V when the pipeline has T2V experts (mode "t2v"), else M2V with an
empty memory (mode "m2v-no-memory"); no transitions, no keyframe selection, no memory bank,
so ``keyframes/`` and ``memory/`` are never written and a shot's record alone is its
checkpoint.

Resume: a story whose folder has ``_COMMITTED.json`` is skipped. Otherwise the shot records
found in storage are trusted in order, the bank and the last frames of the latest recorded
shot are loaded back (lossless), and rendering continues with the first shot that has no
record. With a script, a recorded shot whose video is not the one its record names (two
writers, a lost write) is rendered again, with the shots after it. Every file is written whole (``storage.write_bytes``), with deterministic keys and
deterministic bytes, so a resumed story is byte-identical to an uninterrupted one.

`StorySession` holds one story's state (memory bank, the previous shot's last frames, the
records so far) and renders "the next shot"; the Ray story workers and the Serve sessions
use it directly. `StoryRunner.render` drives a session through a whole script.
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from storymem_model import output_layout as layout
from storymem_model import storage
from storymem_model.images import image_png, images_sha256, png_image
from storymem_model.records import TIMING_COLUMNS, ShotDone, ShotRecord
from storymem_model.render_config import RenderConfig
from storymem_model.shot_modes import MOTION_FRAMES, ShotMode
from storymem_model.shot_step import (RenderError, SelectedKeyframes, ShotStep, Stopwatch,
                                      story_shot_mode)
from storymem_model.story_script import ShotSpec, StoryScript
from storymem_model.video_io import stitch_mp4

log = logging.getLogger("storymem.runner")

TAIL_FRAMES = MOTION_FRAMES  # MM2V continues from the last 5 frames; MI2V from the last one
TAIL_FILE = "last_frames.png"
M2V_NO_MEMORY = ShotMode.M2V_NO_MEMORY.value  # mode of a memory=False shot without T2V

__all__ = ["M2V_NO_MEMORY", "RenderError", "SHOTS_SCHEMA", "StoryResult", "StoryRunner",
           "StorySession", "TIMING_COLUMNS", "image_png", "images_sha256", "open_runner",
           "png_image", "shots_table"]


@dataclass
class StoryResult:
    story_id: str
    config_hash: str
    story_uri: str
    status: str  # "rendered" (from scratch), "resumed" or "skipped" (already committed)
    shots_total: int
    shots_rendered: int  # in this call
    video_uri: str
    parquet_uri: str
    seconds: float
    rows: list[ShotRecord] = field(default_factory=list)


ProgressCallback = Callable[[ShotDone], None]


def shots_table(rows):
    """Shot records (or row dicts) -> pyarrow Table with the shots.parquet schema."""
    return ShotRecord.table(rows)


def SHOTS_SCHEMA():  # noqa: N802 - a constant, built lazily so pyarrow loads on demand
    return ShotRecord.arrow_schema()


def open_runner(spec, pipeline=None, scorers=None) -> "StoryRunner":
    """A StoryRunner for a `render_spec.RenderSpec`: loads the model and scorers it names
    (unless given, e.g. Ray actor proxies) and its reference images. The runner checks that
    the loaded model is the one the spec's config was resolved for."""
    from storymem_model.render_spec import load_references

    if pipeline is None:
        from storymem_model.model_loading import build_pipeline

        pipeline = build_pipeline(spec.model)
    if scorers is None and spec.scorers is not None:
        from storymem_model.scorers.factory import build_keyframe_scorers

        scorers = build_keyframe_scorers(spec.scorers)
    return StoryRunner(pipeline, scorers, spec.config,
                       references=load_references(spec.references))


# ---------------------------------------------------------------------------------------
class StoryRunner:
    """Renders story scripts with one loaded pipeline, one set of scorers and one config.

    `pipeline` follows StoryMemPipeline (generate_shot, encode_keyframes, model_id, ...),
    `scorers` is a KeyframeScorers (embedder, gate, gate_threshold) - any objects with the
    scorer protocols work, Ray actor proxies included; None when the config has memory
    off. `references` are the MR2V reference images; their hashes must be the config's
    `references_sha256`.
    """

    def __init__(self, pipeline, scorers, config: RenderConfig,
                 references: list[np.ndarray] | None = None):
        self.pipeline = pipeline
        self.scorers = scorers
        self.config = config
        self.references = [np.asarray(r, dtype=np.uint8) for r in (references or [])]
        if images_sha256(self.references) != tuple(config.references_sha256):
            raise RenderError("the reference images given to the runner are not the ones "
                              "the config was made for (references_sha256 differs)")
        for name in ("model_id", "lora_id", "t2v_model_id"):
            loaded = getattr(pipeline, name, None)
            wanted = getattr(config, name)
            if name == "t2v_model_id" and (wanted is None or loaded is None):
                continue  # a config may leave T2V out (first shots by M2V)
            if name == "model_id" and loaded is None:
                continue
            if loaded != wanted:
                raise RenderError(f"config.{name} {wanted!r} does not match the loaded "
                                  f"pipeline's {name} {loaded!r}")
        if config.memory and scorers is None:
            raise RenderError("rendering with memory needs keyframe scorers")
        self.step = ShotStep(pipeline, scorers, config)
        self.config_hash = self.step.config_hash

    # -- layout ----------------------------------------------------------------------
    def story_uri(self, script_or_id: StoryScript | str, out_uri: str) -> str:
        story_id = script_or_id if isinstance(script_or_id, str) else script_or_id.story_id
        return layout.story_uri(out_uri, story_id, self.config_hash)

    def is_committed(self, script: StoryScript | str, out_uri: str) -> bool:
        return storage.is_committed(self.story_uri(script, out_uri))

    # -- whole stories -----------------------------------------------------------------
    def open_session(self, script: StoryScript, out_uri: str) -> "StorySession":
        return StorySession(self, script.story_id, self.story_uri(script, out_uri),
                            story_name=script.story_name, script=script)

    def render(self, script: StoryScript, out_uri: str,
               progress: bool | ProgressCallback | None = None) -> StoryResult:
        """Render (or resume, or skip) one story; returns where its files are.

        progress: None = a tqdm bar on a terminal, log lines otherwise; False = quiet;
        True = always a bar; a callable receives one `ShotDone` per finished shot."""
        started = time.perf_counter()
        uri = self.story_uri(script, out_uri)
        video_uri = storage.join(uri, layout.story_video_key(script.story_id))
        parquet_uri = storage.join(uri, layout.SHOTS_PARQUET)
        if storage.is_committed(uri):
            log.info("story %s: already committed at %s, skipped", script.story_id, uri)
            return StoryResult(script.story_id, self.config_hash, uri, "skipped",
                               len(script.shots), 0, video_uri, parquet_uri,
                               time.perf_counter() - started)
        session = self.open_session(script, out_uri)
        done_before = len(session.rows)
        status = "resumed" if done_before else "rendered"
        if done_before:
            log.info("story %s: resuming after %d of %d committed shots", script.story_id,
                     done_before, len(script.shots))
        reporter = _Reporter(progress, script, done_before)
        try:
            while (spec := session.next_shot()) is not None:
                reporter.shot_done(session.render_shot(spec))
            session.finish()
        finally:
            reporter.close()
        return StoryResult(script.story_id, self.config_hash, uri, status,
                           len(script.shots), len(script.shots) - done_before, video_uri,
                           parquet_uri, time.perf_counter() - started, list(session.rows))


# ---------------------------------------------------------------------------------------
class StorySession:
    """One story in progress: the memory bank, the last frames, the shot records so far.

    Opening a session loads what is already checkpointed under `story_uri` (resume).
    `render_shot(spec)` renders the next shot and checkpoints it; `finish()` stitches,
    writes shots.parquet and commits. `script` is optional (Serve sessions add shots one
    by one); when given, checkpointed shots must match it.
    """

    def __init__(self, runner: StoryRunner, story_id: str, story_uri: str,
                 story_name: str = "", script: StoryScript | None = None):
        self.runner = runner
        self.config = runner.config
        self.story_id = story_id
        self.story_name = story_name
        self.story_uri = story_uri
        self.script = script
        self.rows: list[ShotRecord] = []
        self.tail: np.ndarray | None = None
        self.bank = None  # a MemoryBank, set by _load_checkpoint
        self._load_checkpoint()

    # -- state -------------------------------------------------------------------------
    def next_shot(self) -> ShotSpec | None:
        if self.script is None:
            raise RenderError("next_shot() needs a session opened with a script")
        index = len(self.rows)
        return self.script.shots[index] if index < len(self.script.shots) else None

    def _uri(self, key: str) -> str:
        return storage.join(self.story_uri, key)

    def _load_checkpoint(self) -> None:
        """(Re)load rows, memory bank and last frames from storage."""
        from storymem_model.memory_bank import MemoryBank

        self.bank = MemoryBank(max_size=self.config.max_memory, sink=self.config.memory_sink)
        self.tail = None
        records = {}
        for rel in storage.list_files(storage.join(self.story_uri, layout.SHOTS_DIR)):
            if rel.endswith(".json") and "/" not in rel:
                row = json.loads(storage.read_bytes(self._uri(f"{layout.SHOTS_DIR}/{rel}")))
                records[int(row["shot_index"])] = ShotRecord.from_row(row)
        rows: list[ShotRecord] = []
        while len(rows) in records:  # trust records in order only, up to the first gap
            rows.append(records[len(rows)])
        if self.script is not None:
            for row, spec in zip(rows, self.script.shots):
                if not row.matches(spec):
                    raise RenderError(
                        f"story {self.story_id}: checkpointed shot {row.scene}/{row.shot} "
                        f"does not match the script; remove {self.story_uri} to render it "
                        f"again")
            rows = rows[:len(self.script.shots)]
            rows = self._verified(rows)
        # Without memory nothing carries over between shots (no bank, no last frames).
        if rows and self.config.memory:
            last = rows[-1]
            mem = layout.memory_key(last.scene, last.shot)
            self.bank = MemoryBank.load(self._uri(f"{mem}/bank"))
            try:
                strip = png_image(storage.read_bytes(self._uri(f"{mem}/{TAIL_FILE}")))
            except FileNotFoundError:
                raise RenderError(f"story {self.story_id}: checkpoint {mem} has no "
                                  f"{TAIL_FILE}") from None
            self.tail = strip.reshape(-1, int(last.height), *strip.shape[1:])
        elif self.runner.references:
            self.bank.add_references(self.runner.references, story_id=self.story_id,
                                     embedder=self.runner.step.reference_embedder())
        self.rows = rows

    def _verified(self, rows: list[ShotRecord]) -> list[ShotRecord]:
        """The checkpointed rows whose shot video still is the one its record names.

        A video that differs from its record (two writers rendered the story at once, or a
        write was lost) is rendered again instead of failing `finish()` forever: the rows
        from that shot on are dropped - from the story's start when the memory checkpoint
        of the shot before it is gone (only the latest shot's is kept) - and their records
        are removed, latest first, so a crash meanwhile leaves a consistent prefix."""
        from storymem_model.memory_bank import MANIFEST

        bad = next((i for i, row in enumerate(rows)
                    if self._video_sha256(row) != row.video_sha256), None)
        if bad is None:
            return rows
        keep = bad
        if self.config.memory:
            while keep > 0:
                mem = layout.memory_key(rows[keep - 1].scene, rows[keep - 1].shot)
                if storage.exists(self._uri(f"{mem}/bank/{MANIFEST}")) and \
                        storage.exists(self._uri(f"{mem}/{TAIL_FILE}")):
                    break
                keep -= 1
        row = rows[bad]
        log.warning("story %s: %s is not the video its shot record names (two writers?); "
                    "rendering again from shot %d of %d", self.story_id, row.video_key,
                    keep + 1, len(self.script.shots) if self.script else len(rows))
        for dropped in reversed(rows[keep:]):
            storage.remove(self._uri(layout.shot_record_key(dropped.scene, dropped.shot)))
        return rows[:keep]

    def _video_sha256(self, row: ShotRecord) -> str | None:
        try:
            return storage.sha256_hex(storage.read_bytes(self._uri(row.video_key)))
        except FileNotFoundError:
            return None

    # -- one shot ----------------------------------------------------------------------
    def shot_mode(self, spec: ShotSpec) -> ShotMode:
        """t2v | mr2v | m2v | mi2v | mm2v for this shot; t2v | m2v-no-memory without
        memory."""
        return story_shot_mode(self.config, spec.shot_index, spec.cut,
                               has_references=bool(self.runner.references),
                               has_t2v=self.runner.step.has_t2v)

    def render_shot(self, spec: ShotSpec, before_write=None) -> ShotRecord:
        """Plan, generate, select keyframes, update memory, write and checkpoint one shot.
        `before_write()` runs after generation, before anything is written or the memory
        bank changes (see `ShotStep.render`)."""
        from storymem_model.seeds import shot_seed

        if spec.shot_index != len(self.rows):
            raise RenderError(f"story {self.story_id}: shot index {spec.shot_index} is not "
                              f"the next shot ({len(self.rows)})")
        cfg = self.config
        step = self.runner.step
        where = f"story {self.story_id}, scene {spec.scene}, shot {spec.shot}"
        clock = Stopwatch()
        plan = step.plan(spec.prompt, self.shot_mode(spec),
                         shot_seed(cfg.seed, spec.scene, spec.shot), self.bank)
        stored = None  # new keyframes must not duplicate any keyframe stored earlier
        if cfg.memory and any(e.kind == "keyframe" for e in self.bank.stored):
            stored = self.bank.stored_embeddings()

        def write_state(frames: np.ndarray, selected: SelectedKeyframes) -> None:
            if spec.shot_index == 0:
                self._write_story_files()
            if cfg.memory:
                self.bank.add(selected.entries)
                self._write_memory(spec, frames)

        # A failed write goes back to the last checkpoint, so the same shot can simply be
        # rendered again.
        shot = step.render(plan, self.story_uri, spec, story_id=self.story_id,
                           story_name=self.story_name, bank=self.bank, given=self.tail,
                           select=cfg.memory, stored_embeddings=stored, where=where,
                           clock=clock, before_write=before_write, before_record=write_state,
                           on_write_error=self._load_checkpoint)
        row, frames = shot.record, shot.frames
        previous = self.rows[-1] if self.rows else None
        self.rows.append(row)
        self.tail = frames[-TAIL_FRAMES:].copy()
        if previous is not None and cfg.memory:  # its bank is superseded; finish() also
            # sweeps leftovers
            try:
                storage.remove(self._uri(layout.memory_key(previous.scene, previous.shot)))
            except (OSError, storage.StorageError) as exc:
                log.warning("story %s: could not remove an old memory checkpoint: %s",
                            self.story_id, exc)
        return row

    def _write_story_files(self) -> None:
        storage.write_bytes(self._uri(layout.CONFIG_FILE), json.dumps(
            self.config.to_dict(), indent=1, sort_keys=True).encode("utf-8"))
        if self.script is not None:
            storage.write_bytes(self._uri(layout.SCRIPT_FILE), json.dumps(
                self.script.to_dict(), indent=1, ensure_ascii=False).encode("utf-8"))

    def _write_memory(self, spec: ShotSpec, frames: np.ndarray) -> None:
        """The memory bank after this shot and its last frames (lossless, stacked top to
        bottom in one PNG), for resuming and for MI2V/MM2V continuation."""
        mem = layout.memory_key(spec.scene, spec.shot)
        self.bank.save(self._uri(f"{mem}/bank"))
        tail = frames[-TAIL_FRAMES:]
        storage.write_bytes(self._uri(f"{mem}/{TAIL_FILE}"),
                            image_png(tail.reshape(-1, *tail.shape[2:])))

    # -- the end -----------------------------------------------------------------------
    def finish(self) -> dict:
        """Stitch the story video, write shots.parquet, clean stale memory, commit."""
        import pyarrow.parquet as pq

        if not self.rows:
            raise RenderError(f"story {self.story_id}: no shots to commit")
        if self.script is not None and len(self.rows) != len(self.script.shots):
            raise RenderError(f"story {self.story_id}: {len(self.rows)} of "
                              f"{len(self.script.shots)} shots rendered; cannot commit")
        videos = [storage.read_bytes(self._uri(r.video_key)) for r in self.rows]
        for row, data in zip(self.rows, videos):
            if storage.sha256_hex(data) != row.video_sha256:
                raise RenderError(f"story {self.story_id}: {row.video_key} changed "
                                  f"since its shot was checkpointed")
        story_key = layout.story_video_key(self.story_id)
        storage.write_bytes(self._uri(story_key), stitch_mp4(videos))
        buffer = io.BytesIO()
        pq.write_table(shots_table(self.rows), buffer)
        storage.write_bytes(self._uri(layout.SHOTS_PARQUET), buffer.getvalue())

        last = self.rows[-1]
        keep = layout.memory_key(last.scene, last.shot) + "/"
        files = storage.list_files(self.story_uri)
        for rel in files:  # memory checkpoints of earlier shots left by a crash
            if rel.startswith(layout.MEMORY_DIR + "/") and not rel.startswith(keep):
                storage.remove(self._uri(rel))
        files = storage.list_files(self.story_uri)
        metadata = {
            "story_id": self.story_id, "story_name": self.story_name,
            "config_hash": self.runner.config_hash, "shots": len(self.rows),
            "frames": int(sum(r.num_frames for r in self.rows)),
            "story_video": story_key, "shots_parquet": layout.SHOTS_PARQUET,
            "config": self.config.to_dict(),
        }
        return storage.write_commit_marker(self.story_uri, files, metadata)


# ---------------------------------------------------------------------------------------
class _Reporter:
    """Per-shot progress: tqdm on a terminal, log lines otherwise, or a callback."""

    def __init__(self, progress, script: StoryScript, done: int):
        self.callback = progress if callable(progress) else None
        self.script = script
        self.bar = None
        use_bar = progress is True or (progress is None and sys.stderr.isatty())
        if use_bar and self.callback is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(script.shots), initial=done, unit="shot",
                            desc=script.story_id[:40], leave=False)
        self.quiet = progress is False

    def shot_done(self, row: ShotRecord) -> None:
        total = len(self.script.shots)
        event = ShotDone(story_id=row.story_id, shot_index=row.shot_index, shots_total=total,
                         scene=row.scene, shot=row.shot, mode=row.mode,
                         seconds=row.shot_seconds)
        if self.callback is not None:
            self.callback(event)
        elif self.bar is not None:
            self.bar.update(1)
        elif not self.quiet:
            log.info("%s", describe_shot_done(event))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_shot_done(event: ShotDone) -> str:
    """The one log line for a finished shot."""
    return (f"story {event.story_id}: shot {event.shot_index + 1}/{event.shots_total} "
            f"(scene {event.scene} shot {event.shot}, {event.mode}) done in "
            f"{event.seconds:.1f} s")
