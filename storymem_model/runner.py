"""The story runner: renders a whole script shot by shot, checkpointing after every shot.

Per shot: take the memory -> generate (T2V or MR2V for the first shot, then M2V; MI2V or
MM2V for shots with ``cut: false`` as ``config.transition`` says) -> embed and score every
frame once -> select keyframes -> update the memory bank -> write the shot's files ->
write the shot's record (its checkpoint). After the last shot: stitch the story video,
write ``shots.parquet`` and finally ``_COMMITTED.json``. The layout is in
``storymem_model/output_layout.py`` and the README.

Without memory (``config.memory`` False, the "independent shots" baseline) every shot is
generated on its own: T2V when the pipeline has T2V experts (mode "t2v"), else M2V with an
empty memory (mode "m2v-no-memory"); no transitions, no keyframe selection, no memory bank,
so ``keyframes/`` and ``memory/`` are never written and a shot's record alone is its
checkpoint.

Resume: a story whose folder has ``_COMMITTED.json`` is skipped. Otherwise the shot records
found in storage are trusted in order, the bank and the last frames of the latest recorded
shot are loaded back (lossless), and rendering continues with the first shot that has no
record. Every file is written whole (``storage.write_bytes``), with deterministic keys and
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
from typing import Any, Callable

import numpy as np

from storymem_model import output_layout as layout
from storymem_model import storage
from storymem_model.render_config import RenderConfig
from storymem_model.story_script import ShotSpec, StoryScript
from storymem_model.video_io import encode_mp4, stitch_mp4

log = logging.getLogger("storymem.runner")

TAIL_FRAMES = 5  # MM2V continues from the last 5 frames; MI2V from the last one
TAIL_FILE = "last_frames.png"
M2V_NO_MEMORY = "m2v-no-memory"  # mode of a memory=False shot without T2V experts


class RenderError(RuntimeError):
    """A story that could not be rendered, naming the story, the shot and the reason."""


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
    rows: list[dict] = field(default_factory=list)


ProgressCallback = Callable[[dict], None]


# ---------------------------------------------------------------------------------------
def image_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).copy()


def images_sha256(images: list[np.ndarray]) -> tuple[str, ...]:
    """Hash of each image's pixels and shape (what RenderConfig.references_sha256 holds)."""
    out = []
    for image in images:
        arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        out.append(storage.sha256_hex(repr(arr.shape).encode() + arr.tobytes()))
    return tuple(out)


def shots_table(rows: list[dict]):
    """Rows -> pyarrow Table with the fixed shots.parquet schema."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=SHOTS_SCHEMA())


def SHOTS_SCHEMA():  # noqa: N802 - a constant, built lazily so pyarrow loads on demand
    import pyarrow as pa

    return pa.schema([
        ("story_id", pa.string()), ("story_name", pa.string()),
        ("config_hash", pa.string()),
        ("scene", pa.int32()), ("shot", pa.int32()), ("shot_index", pa.int32()),
        ("prompt", pa.string()), ("first_frame_prompt", pa.string()),
        ("cut", pa.bool_()), ("mode", pa.string()), ("seed", pa.int64()),
        ("memory_keyframe_ids", pa.list_(pa.string())),
        ("num_frames", pa.int32()), ("fps", pa.int32()),
        ("height", pa.int32()), ("width", pa.int32()),
        ("video_key", pa.string()), ("video_uri", pa.string()),
        ("video_sha256", pa.string()),
        ("keyframe_ids", pa.list_(pa.string())),
        ("keyframe_frame_indices", pa.list_(pa.int32())),
        ("keyframe_scores", pa.list_(pa.float32())),
        ("model_id", pa.string()), ("lora_id", pa.string()),
        ("t2v_model_id", pa.string()),
        ("generate_seconds", pa.float64()), ("select_seconds", pa.float64()),
        ("write_seconds", pa.float64()), ("shot_seconds", pa.float64()),
    ])


TIMING_COLUMNS = ("generate_seconds", "select_seconds", "write_seconds", "shot_seconds")


# ---------------------------------------------------------------------------------------
class StoryRunner:
    """Renders story scripts with one loaded pipeline, one set of scorers and one config.

    `pipeline` follows StoryMemPipeline (generate_shot, encode_keyframes, model_id, ...),
    `scorers` is a KeyframeScorers (embedder, gate, gate_threshold) - any objects with the
    scorer protocols work, Ray actor proxies included. `references` are the MR2V reference
    images; their hashes must be the config's `references_sha256`.
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
        model_id = getattr(pipeline, "model_id", None)
        if model_id is not None and model_id != config.model_id:
            raise RenderError(f"config.model_id {config.model_id!r} does not match the "
                              f"loaded pipeline's model_id {model_id!r}")
        self.config_hash = config.config_hash()

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
        True = always a bar; a callable receives one dict per finished shot."""
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
                row = session.render_shot(spec)
                reporter.shot_done(row)
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
        self.rows: list[dict] = []
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
                records[int(row["shot_index"])] = row
        rows = []
        while len(rows) in records:  # trust records in order only, up to the first gap
            rows.append(records[len(rows)])
        if self.script is not None:
            for row, spec in zip(rows, self.script.shots):
                if (row["scene"], row["shot"], row["prompt"], row["cut"]) != (
                        spec.scene, spec.shot, spec.prompt, spec.cut):
                    raise RenderError(
                        f"story {self.story_id}: checkpointed shot {row['scene']}/"
                        f"{row['shot']} does not match the script; remove "
                        f"{self.story_uri} to render it again")
            rows = rows[:len(self.script.shots)]
        # Without memory nothing carries over between shots (no bank, no last frames).
        if rows and self.config.memory:
            last = rows[-1]
            mem = layout.memory_key(last["scene"], last["shot"])
            self.bank = MemoryBank.load(self._uri(f"{mem}/bank"))
            try:
                strip = png_image(storage.read_bytes(self._uri(f"{mem}/{TAIL_FILE}")))
            except FileNotFoundError:
                raise RenderError(f"story {self.story_id}: checkpoint {mem} has no "
                                  f"{TAIL_FILE}") from None
            height = int(last["height"])
            self.tail = strip.reshape(-1, height, *strip.shape[1:])
        elif self.runner.references:
            self.bank.add_references(self.runner.references, story_id=self.story_id,
                                     embedder=self.runner.scorers.embedder)
        self.rows = rows

    # -- one shot ----------------------------------------------------------------------
    def shot_mode(self, spec: ShotSpec) -> str:
        """t2v | mr2v | m2v | mi2v | mm2v for this shot; t2v | m2v-no-memory without
        memory."""
        has_t2v = bool(self.config.t2v_model_id and getattr(self.runner.pipeline, "has_t2v",
                                                            False))
        if not self.config.memory:
            return "t2v" if has_t2v else M2V_NO_MEMORY
        if spec.shot_index == 0:
            if self.runner.references:
                return "mr2v"
            if has_t2v:
                return "t2v"
            return "m2v"
        if not spec.cut and self.config.transition != "none":
            return self.config.transition
        return "m2v"

    def render_shot(self, spec: ShotSpec) -> dict:
        """Generate, select keyframes, update memory, write and checkpoint one shot."""
        from storymem_model.keyframe_selection import extract_keyframes
        from storymem_model.memory_bank import KeyframeEntry
        from storymem_model.seeds import shot_seed

        if spec.shot_index != len(self.rows):
            raise RenderError(f"story {self.story_id}: shot index {spec.shot_index} is not "
                              f"the next shot ({len(self.rows)})")
        cfg = self.config
        pipeline = self.runner.pipeline
        scorers = self.runner.scorers
        where = f"story {self.story_id}, scene {spec.scene}, shot {spec.shot}"
        mode = self.shot_mode(spec)
        if mode in ("mi2v", "mm2v") and self.tail is None:
            raise RenderError(f"{where}: {mode} needs the previous shot's frames")
        seed = shot_seed(cfg.seed, spec.scene, spec.shot)
        t0 = time.perf_counter()

        uses_memory = cfg.memory and mode != "t2v"
        memory_entries = list(self.bank.memory_for_shot(
            spec.prompt, scorers.embedder, prompt_aware=cfg.prompt_aware_memory)) \
            if uses_memory else []
        # T2V shots run with the T2V experts' sampling, every other mode with the M2V one
        sampling = cfg.t2v_sampling if mode == "t2v" else cfg.sampling
        kwargs: dict[str, Any] = dict(
            seed=seed, rope_shift=cfg.rope_shift, negative_prompt=cfg.negative_prompt,
            height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, **sampling)
        if mode == "t2v":
            kwargs["use_t2v"] = True
        elif memory_entries:
            kwargs["memory_latents"] = self.bank.latents(
                pipeline.encode_keyframes, cfg.height, cfg.width, entries=memory_entries)
        if mode == "mi2v":
            kwargs["first_frame"] = self.tail[-1]
        elif mode == "mm2v":
            if len(self.tail) < TAIL_FRAMES:
                raise RenderError(f"{where}: mm2v needs {TAIL_FRAMES} previous frames, "
                                  f"the previous shot has {len(self.tail)}")
            kwargs["motion_frames"] = self.tail[-TAIL_FRAMES:]
        try:
            frames = np.asarray(pipeline.generate_shot(spec.prompt, **kwargs))
        except Exception as exc:
            raise RenderError(f"{where}: generation failed: {exc}") from exc
        expected = cfg.frames_per_shot["m2v" if mode == M2V_NO_MEMORY else mode]
        if frames.shape != (expected, cfg.height, cfg.width, 3) or frames.dtype != np.uint8:
            raise RenderError(f"{where}: the pipeline returned frames of shape "
                              f"{frames.shape} {frames.dtype}, expected "
                              f"{(expected, cfg.height, cfg.width, 3)} uint8 ({mode})")
        t1 = time.perf_counter()

        if cfg.memory:
            # Every frame embedded and gate-scored once, in one batch each; new keyframes
            # must not duplicate any keyframe stored earlier in the story.
            stored = [e for e in self.bank.stored if e.kind == "keyframe"]
            selected = extract_keyframes(
                frames, scorers, self.bank.stored_embeddings() if stored else None,
                threshold=cfg.keyframe_threshold, step=cfg.keyframe_step,
                max_keyframes=cfg.max_keyframes, min_score=cfg.gate_threshold,
                duplicate_threshold=cfg.duplicate_threshold)
            embeddings, scores = selected.embeddings, selected.scores
            chosen = [int(i) for i in selected.indices]
            entries = KeyframeEntry.from_shot(
                frames, chosen, story_id=self.story_id, scene=spec.scene, shot=spec.shot,
                prompt=spec.prompt, embeddings=embeddings, scores=scores)
            self.bank.add(entries)
        else:  # no memory: no keyframes to select, no bank to update
            scores, chosen, entries = None, [], []
        t2 = time.perf_counter()
        try:
            row = self._write_shot(spec, mode, seed, frames, entries, memory_entries, chosen,
                                   scores)
            t3 = time.perf_counter()
            row.update(generate_seconds=t1 - t0, select_seconds=t2 - t1,
                       write_seconds=t3 - t2, shot_seconds=t3 - t0)
            # The shot's record is its checkpoint: written last, after every file it names.
            storage.write_bytes(self._uri(layout.shot_record_key(spec.scene, spec.shot)),
                                json.dumps(row, indent=1, sort_keys=True).encode("utf-8"))
        except Exception:
            # Back to the last checkpoint, so the same shot can simply be rendered again.
            self._load_checkpoint()
            raise
        previous = self.rows[-1] if self.rows else None
        self.rows.append(row)
        self.tail = frames[-TAIL_FRAMES:].copy()
        if previous is not None and cfg.memory:  # its bank is superseded; finish() also
            # sweeps leftovers
            try:
                storage.remove(self._uri(layout.memory_key(previous["scene"],
                                                           previous["shot"])))
            except (OSError, storage.StorageError) as exc:
                log.warning("story %s: could not remove an old memory checkpoint: %s",
                            self.story_id, exc)
        return row

    def _write_shot(self, spec, mode, seed, frames, entries, memory_entries, chosen,
                    scores) -> dict:
        cfg = self.config
        if spec.shot_index == 0:
            storage.write_bytes(self._uri(layout.CONFIG_FILE), json.dumps(
                cfg.to_dict(), indent=1, sort_keys=True).encode("utf-8"))
            if self.script is not None:
                storage.write_bytes(self._uri(layout.SCRIPT_FILE), json.dumps(
                    self.script.to_dict(), indent=1, ensure_ascii=False).encode("utf-8"))
        video = encode_mp4(frames, cfg.fps)
        video_key = layout.shot_video_key(spec.scene, spec.shot)
        storage.write_bytes(self._uri(video_key), video)
        for entry in entries:
            storage.write_bytes(self._uri(layout.keyframe_key(entry.keyframe_id)),
                                image_png(entry.image))
        if cfg.memory:
            mem = layout.memory_key(spec.scene, spec.shot)
            self.bank.save(self._uri(f"{mem}/bank"))
            # The last frames, lossless, stacked top to bottom in one PNG.
            tail = frames[-TAIL_FRAMES:]
            storage.write_bytes(self._uri(f"{mem}/{TAIL_FILE}"),
                                image_png(tail.reshape(-1, *tail.shape[2:])))
        return {
            "story_id": self.story_id, "story_name": self.story_name,
            "config_hash": self.runner.config_hash,
            "scene": spec.scene, "shot": spec.shot, "shot_index": spec.shot_index,
            "prompt": spec.prompt, "first_frame_prompt": spec.first_frame_prompt,
            "cut": spec.cut, "mode": mode, "seed": seed,
            "memory_keyframe_ids": [e.keyframe_id for e in memory_entries],
            "num_frames": int(frames.shape[0]), "fps": cfg.fps,
            "height": cfg.height, "width": cfg.width,
            "video_key": video_key,
            "video_uri": storage.absolute_uri(self._uri(video_key)),
            "video_sha256": storage.sha256_hex(video),
            "keyframe_ids": [e.keyframe_id for e in entries],
            "keyframe_frame_indices": chosen,
            "keyframe_scores": [float(scores[i]) for i in chosen],
            "model_id": cfg.model_id, "lora_id": cfg.lora_id,
            "t2v_model_id": cfg.t2v_model_id,
        }

    # -- the end -----------------------------------------------------------------------
    def finish(self) -> dict:
        """Stitch the story video, write shots.parquet, clean stale memory, commit."""
        import pyarrow.parquet as pq

        if not self.rows:
            raise RenderError(f"story {self.story_id}: no shots to commit")
        if self.script is not None and len(self.rows) != len(self.script.shots):
            raise RenderError(f"story {self.story_id}: {len(self.rows)} of "
                              f"{len(self.script.shots)} shots rendered; cannot commit")
        videos = [storage.read_bytes(self._uri(r["video_key"])) for r in self.rows]
        for row, data in zip(self.rows, videos):
            if storage.sha256_hex(data) != row["video_sha256"]:
                raise RenderError(f"story {self.story_id}: {row['video_key']} changed "
                                  f"since its shot was checkpointed")
        story_key = layout.story_video_key(self.story_id)
        storage.write_bytes(self._uri(story_key), stitch_mp4(videos))
        buffer = io.BytesIO()
        pq.write_table(shots_table(self.rows), buffer)
        storage.write_bytes(self._uri(layout.SHOTS_PARQUET), buffer.getvalue())

        last = self.rows[-1]
        keep = layout.memory_key(last["scene"], last["shot"]) + "/"
        files = storage.list_files(self.story_uri)
        for rel in files:  # memory checkpoints of earlier shots left by a crash
            if rel.startswith(layout.MEMORY_DIR + "/") and not rel.startswith(keep):
                storage.remove(self._uri(rel))
        files = storage.list_files(self.story_uri)
        metadata = {
            "story_id": self.story_id, "story_name": self.story_name,
            "config_hash": self.runner.config_hash, "shots": len(self.rows),
            "frames": int(sum(r["num_frames"] for r in self.rows)),
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

    def shot_done(self, row: dict) -> None:
        total = len(self.script.shots)
        if self.callback is not None:
            self.callback({"story_id": row["story_id"], "shot_index": row["shot_index"],
                           "shots_total": total, "scene": row["scene"], "shot": row["shot"],
                           "mode": row["mode"], "seconds": row["shot_seconds"]})
        elif self.bar is not None:
            self.bar.update(1)
        elif not self.quiet:
            log.info("story %s: shot %d/%d (scene %d shot %d, %s) done in %.1f s",
                     row["story_id"], row["shot_index"] + 1, total, row["scene"],
                     row["shot"], row["mode"], row["shot_seconds"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
