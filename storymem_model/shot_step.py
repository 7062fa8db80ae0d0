"""One shot: plan -> generate -> select keyframes -> write. Every host renders through this.

The in-process story runner, the Ray story workers (through the runner), the Serve
sessions (a `StorySession`) and the Serve single-shot endpoint all call `ShotStep`, so the
mode rules, the generation arguments, keyframe selection and the files written are the
same code everywhere:

* `plan(...)`: the shot's mode, seed, sampling (T2V shots use the T2V experts' sampling)
  and the memory entries it is conditioned on;
* `generate(plan, bank, given)`: the pipeline call (memory latents cached per keyframe in
  the bank; `given` frames for MI2V/MM2V), checked for the expected frame count;
* `select(frames, ...)`: every frame embedded and gate-scored once, the reference keyframe
  selection, the new `KeyframeEntry`s;
* `write(folder, ...)`: the shot's video and keyframe PNGs in the story layout
  (`output_layout`), returning its `ShotRecord`;
* `render(plan, folder, ...)`: generate -> select -> write -> the host's own files ->
  the record with its timings, written last (the shot's checkpoint). The story session
  and the single-shot endpoint both render a shot with it.

The modes themselves (`ShotMode`, the frames each is given) are in `shot_modes`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from storymem_model import output_layout as layout
from storymem_model import storage
from storymem_model.images import image_png
from storymem_model.records import ShotRecord, ShotStats
from storymem_model.render_config import RenderConfig
from storymem_model.shot_modes import MOTION_FRAMES, ShotMode

__all__ = ["MOTION_FRAMES", "NO_KEYFRAMES", "RenderError", "RenderedShot", "SelectedKeyframes",
           "ShotMode", "ShotPlan", "ShotStats", "ShotStep", "Stopwatch", "given_frames_of",
           "story_shot_mode", "write_record"]


class RenderError(RuntimeError):
    """A story or shot that could not be rendered, naming the story, the shot and why."""


def story_shot_mode(config: RenderConfig, shot_index: int, cut: bool, *,
                    has_references: bool, has_t2v: bool) -> ShotMode:
    """The mode of a story's shot: T2V or MR2V first, then M2V, MI2V/MM2V for `cut: false`
    as `config.transition` says; without memory T2V (or M2V with no memory)."""
    if not config.memory:
        return ShotMode.T2V if has_t2v else ShotMode.M2V_NO_MEMORY
    if shot_index == 0:
        if has_references:
            return ShotMode.MR2V
        return ShotMode.T2V if has_t2v else ShotMode.M2V
    if not cut and config.transition != "none":
        return ShotMode(config.transition)
    return ShotMode.M2V


@dataclass(frozen=True)
class ShotPlan:
    """What one shot will be, before any model work."""

    mode: ShotMode
    prompt: str
    seed: int
    memory: tuple  # KeyframeEntry objects the shot is conditioned on, in order
    sampling: dict

    @property
    def memory_ids(self) -> list[str]:
        return [entry.keyframe_id for entry in self.memory]


@dataclass(frozen=True)
class SelectedKeyframes:
    """Keyframes picked from a shot: frame indices, their gate scores, new memory entries."""

    indices: list[int]
    scores: list[float]
    entries: list


NO_KEYFRAMES = SelectedKeyframes([], [], [])


@dataclass(frozen=True)
class RenderedShot:
    """A rendered shot: its record (written), its frames and the keyframes picked from it."""

    record: ShotRecord
    frames: np.ndarray
    selected: SelectedKeyframes


class ShotStep:
    """The shot step for one pipeline, one set of scorers and one config."""

    def __init__(self, pipeline, scorers, config: RenderConfig):
        self.pipeline = pipeline
        self.scorers = scorers
        self.config = config
        self.config_hash = config.config_hash()
        self.has_t2v = bool(config.t2v_model_id and getattr(pipeline, "has_t2v", False))

    # -- plan --------------------------------------------------------------------------
    def plan(self, prompt: str, mode: ShotMode, seed: int, bank=None) -> ShotPlan:
        """Memory for the shot (the bank's current memory, prompt-aware when configured)
        and its sampling (T2V shots: the T2V experts' own)."""
        if mode == ShotMode.T2V and not self.has_t2v:
            raise RenderError("mode t2v needs a model with T2V experts")
        memory: tuple = ()
        if mode.uses_memory and bank is not None:
            memory = tuple(bank.memory_for_shot(prompt, getattr(self.scorers, "embedder", None),
                                                prompt_aware=self.config.prompt_aware_memory))
        sampling = self.config.t2v_sampling if mode == ShotMode.T2V else self.config.sampling
        return ShotPlan(mode=mode, prompt=prompt, seed=int(seed), memory=memory,
                        sampling=dict(sampling))

    # -- generate ----------------------------------------------------------------------
    def generate(self, plan: ShotPlan, bank=None, given: np.ndarray | None = None,
                 where: str = "shot", stats=None) -> np.ndarray:
        """The shot's frames (F, H, W, 3) uint8. `given`: the frames it continues from
        (at least 1 for MI2V, 5 for MM2V; the last ones are used). `stats` (a
        `ShotStats`) receives the shot's model evaluations and denoise time."""
        cfg = self.config
        kwargs = dict(seed=plan.seed, rope_shift=cfg.rope_shift,
                      negative_prompt=cfg.negative_prompt, height=cfg.height,
                      width=cfg.width, num_frames=cfg.num_frames, **plan.sampling)
        if cfg.fix_mem is not None:
            kwargs["fix_mem"] = cfg.fix_mem
        if stats is not None:
            kwargs["stats"] = stats
        if plan.mode == ShotMode.T2V:
            kwargs["use_t2v"] = True
        elif plan.memory:
            kwargs["memory_latents"] = bank.latents(self.pipeline.encode_keyframes, cfg.height,
                                                    cfg.width, entries=list(plan.memory))
        needed = plan.mode.given_frames
        if needed:
            if given is None or len(given) < needed:
                have = 0 if given is None else len(given)
                raise RenderError(f"{where}: {plan.mode} needs {needed} previous frame(s), "
                                f"{have} given")
            key = "first_frame" if plan.mode == ShotMode.MI2V else "motion_frames"
            kwargs[key] = given[-1] if needed == 1 else given[-needed:]
        try:
            frames = np.asarray(self.pipeline.generate_shot(plan.prompt, **kwargs))
        except Exception as exc:
            raise RenderError(f"{where}: generation failed: {exc}") from exc
        expected = (cfg.frames_for_mode(plan.mode), cfg.height, cfg.width, 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise RenderError(f"{where}: the pipeline returned frames of shape {frames.shape} "
                            f"{frames.dtype}, expected {expected} uint8 ({plan.mode})")
        return frames

    # -- select ------------------------------------------------------------------------
    def select(self, frames: np.ndarray, stored_embeddings, *, story_id: str, scene: int,
               shot: int, prompt: str) -> SelectedKeyframes:
        """Embed and gate-score every frame once, pick keyframes (reference algorithm);
        `stored_embeddings`: embeddings of keyframes a new one must not duplicate."""
        from storymem_model.keyframe_selection import extract_keyframes
        from storymem_model.memory_bank import KeyframeEntry

        cfg = self.config
        selected = extract_keyframes(
            frames, self.scorers, stored_embeddings, preprocess=cfg.keyframe_preprocess,
            threshold=cfg.keyframe_threshold,
            step=cfg.keyframe_step, max_keyframes=cfg.max_keyframes,
            min_score=cfg.gate_threshold, duplicate_threshold=cfg.duplicate_threshold)
        chosen = [int(i) for i in selected.indices]
        entries = KeyframeEntry.from_shot(
            frames, chosen, story_id=story_id, scene=scene, shot=shot, prompt=prompt,
            embeddings=selected.embeddings, scores=selected.scores)
        return SelectedKeyframes(chosen, [float(selected.scores[i]) for i in chosen], entries)

    def reference_embedder(self):
        """The embedder for images compared with keyframes (MR2V references, a single
        shot's memory images): they are prepared as keyframe selection prepares frames."""
        from storymem_model.scorers.base import FrameEmbedder

        return FrameEmbedder(self.scorers.embedder, self.config.keyframe_preprocess)

    # -- write -------------------------------------------------------------------------
    def write(self, folder_uri: str, spec, plan: ShotPlan, frames: np.ndarray,
              selected: SelectedKeyframes, *, story_id: str, story_name: str,
              stats=None) -> ShotRecord:
        """Write the shot's video and keyframe PNGs under `folder_uri` (story layout) and
        return its record (not yet written: the caller writes it last, as the checkpoint)."""
        from storymem_model.video_io import encode_mp4

        cfg = self.config
        video = encode_mp4(frames, cfg.fps)
        video_key = layout.shot_video_key(spec.scene, spec.shot)
        video_uri = storage.join(folder_uri, video_key)
        storage.write_bytes(video_uri, video)
        for entry in selected.entries:
            storage.write_bytes(storage.join(folder_uri, layout.keyframe_key(entry.keyframe_id)),
                                image_png(entry.image))
        return ShotRecord(
            story_id=story_id, story_name=story_name, config_hash=self.config_hash,
            scene=spec.scene, shot=spec.shot, shot_index=spec.shot_index, prompt=spec.prompt,
            first_frame_prompt=spec.first_frame_prompt, cut=spec.cut, mode=plan.mode.value,
            seed=plan.seed, memory_keyframe_ids=plan.memory_ids,
            num_frames=int(frames.shape[0]), fps=cfg.fps, height=cfg.height,
            width=cfg.width, video_key=video_key,
            video_uri=storage.absolute_uri(video_uri), video_sha256=storage.sha256_hex(video),
            keyframe_ids=[e.keyframe_id for e in selected.entries],
            keyframe_frame_indices=list(selected.indices),
            keyframe_scores=list(selected.scores), model_id=cfg.model_id,
            lora_id=cfg.lora_id, t2v_model_id=cfg.t2v_model_id,
            model_evaluations=int(getattr(stats, "model_evaluations", 0)),
            denoise_seconds=float(getattr(stats, "denoise_seconds", 0.0)))


    # -- the whole shot ----------------------------------------------------------------
    def render(self, plan: ShotPlan, folder_uri: str, spec, *, story_id: str,
               story_name: str, bank=None, given: np.ndarray | None = None,
               select: bool = False, stored_embeddings=None, where: str = "shot",
               clock: "Stopwatch | None" = None,
               before_write: Callable[[], None] | None = None,
               before_record: Callable[[np.ndarray, SelectedKeyframes], None] | None = None,
               on_write_error: Callable[[], None] | None = None) -> RenderedShot:
        """Generate the shot, select its keyframes (when `select`; `stored_embeddings`:
        those a new keyframe must not duplicate, or None), call `before_write()` (a host
        that may have lost the right to write - e.g. its lease - raises there, and nothing
        is written), write its files under `folder_uri`, call `before_record(frames,
        selected)` (the host's own files), then write the record with its timings last:
        the shot's checkpoint. `clock`: a Stopwatch whose first lap is the generation
        (default: started here). When a write fails, `on_write_error()` runs (e.g. back to
        the last checkpoint) and the error is raised."""
        clock = clock or Stopwatch()
        stats = ShotStats()
        frames = self.generate(plan, bank, given, where=where, stats=stats)
        generate_s = clock.lap()
        selected = NO_KEYFRAMES
        if select:
            selected = self.select(frames, stored_embeddings, story_id=story_id,
                                   scene=spec.scene, shot=spec.shot, prompt=spec.prompt)
        select_s = clock.lap()
        if before_write is not None:
            before_write()
        try:
            record = self.write(folder_uri, spec, plan, frames, selected, story_id=story_id,
                                story_name=story_name, stats=stats)
            if before_record is not None:
                before_record(frames, selected)
            record.generate_seconds, record.select_seconds = generate_s, select_s
            record.write_seconds = clock.lap()
            record.shot_seconds = clock.total()
            write_record(folder_uri, record)
        except Exception:
            if on_write_error is not None:
                on_write_error()
            raise
        return RenderedShot(record, frames, selected)


def write_record(folder_uri: str, record: ShotRecord) -> None:
    """The shot's record, written last: its checkpoint."""
    import json

    storage.write_bytes(storage.join(folder_uri, layout.shot_record_key(record.scene,
                                                                        record.shot)),
                        json.dumps(record.to_row(), indent=1, sort_keys=True).encode("utf-8"))


class Stopwatch:
    """Seconds between laps, for a shot's timing columns."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


def given_frames_of(images: Sequence[np.ndarray] | np.ndarray | None) -> np.ndarray | None:
    """Frames a shot continues from, as one (N, H, W, 3) array (None stays None)."""
    if images is None:
        return None
    return np.stack([np.asarray(i, dtype=np.uint8) for i in images])
