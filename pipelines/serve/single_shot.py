"""`POST /v1/shots`: one shot outside any story, through the story shot step (`ShotStep`).

plan -> generate -> select -> write, exactly as a story shot:

* the request's memory images enter a `MemoryBank` as references (each embedded on its
  own, as a story's reference images are) and condition the shot; its first frame (MI2V)
  or 5 motion frames (MM2V) are the frames the shot continues from. Images are resized
  only inside the pipeline (`conditioning.images_to_tensor`);
* the mode is a `ShotMode`: "auto" resolves to mi2v with a first frame, mm2v with motion
  frames, else m2v; t2v needs a server with T2V experts;
* the request's seed is the plan's seed; its sampling overrides, size and negative prompt
  are `RenderConfig.replace(...)` on the server's config;
* keyframes are selected with the server's thresholds, duplicates of the given memory
  dropped (`select_keyframes: false`, or a server without memory, skips selection);
* the files are written by `ShotStep.render` (`ShotStep.write`, then the record last)
  in the story layout, as a story session writes a shot:

    shots/{scope}/{shot_id}/shots/01_01.mp4, shots/01_01.json (the ShotRecord),
                            keyframes/{keyframe_id}.png
"""
from __future__ import annotations

import base64
import secrets

import numpy as np

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.limits import MAX_STORED_VIDEO_BYTES
from pipelines.serve.schemas import AUTO_MODE, KeyframeOut, ShotRequest, ShotResponse
from storymem_model import output_layout as layout
from storymem_model import storage
from storymem_model.images import image_png
from storymem_model.render_config import (SAMPLING_KEYS, T2V_SHARED_SAMPLING_KEYS,
                                          ConfigError, RenderConfig)
from storymem_model.shot_modes import ShotMode
from storymem_model.shot_step import ShotStep, Stopwatch, given_frames_of
from storymem_model.story_script import ShotSpec

GEOMETRY_KEYS = ("height", "width", "num_frames")
# A single shot is the first shot of the first scene of its own little story.
SINGLE_SHOT_SCENE, SINGLE_SHOT_NUMBER = 1, 1


def new_shot_id() -> str:
    return secrets.token_urlsafe(18)


def shot_folder(root: str, scope: str, shot_id: str) -> str:
    return storage.join(root, "shots", scope, shot_id)


def resolve_mode(requested: str, has_first: bool, has_motion: bool, has_t2v: bool) -> ShotMode:
    if requested == AUTO_MODE:
        return ShotMode.MI2V if has_first else ShotMode.MM2V if has_motion else ShotMode.M2V
    mode = ShotMode(requested)
    if mode == ShotMode.T2V and not has_t2v:
        raise ServeRequestError(422, "t2v_unavailable",
                                "mode t2v needs a server started with --t2v-model-dir; "
                                "use m2v (memory-conditioned) instead")
    return mode


def shot_config(config: RenderConfig, request: ShotRequest) -> RenderConfig:
    """The server's RenderConfig with the request's bounded sampling/geometry overrides and
    negative prompt (T2V shots take the shared sampling keys, as `render`'s flags do)."""
    overrides = request.sampling.model_dump(exclude_none=True)
    changes: dict = {k: overrides.pop(k) for k in GEOMETRY_KEYS if k in overrides}
    changes["sampling"] = {**config.sampling,
                           **{k: v for k, v in overrides.items() if k in SAMPLING_KEYS}}
    if config.t2v_sampling:
        changes["t2v_sampling"] = {**config.t2v_sampling, **{
            k: v for k, v in overrides.items() if k in T2V_SHARED_SAMPLING_KEYS}}
    if request.negative_prompt is not None:
        changes["negative_prompt"] = request.negative_prompt
    try:
        return config.replace(**changes)
    except ConfigError as exc:
        raise ServeRequestError(422, "invalid_sampling", str(exc)) from None


def memory_bank(images: list[np.ndarray], shot_id: str, embedder):
    """A bank holding every request memory image as a reference (in order), embedded by
    `embedder` (`ShotStep.reference_embedder()`: prepared as keyframe selection prepares
    frames); None leaves them unembedded (no keyframe selection)."""
    from storymem_model.memory_bank import MemoryBank

    bank = MemoryBank(max_size=max(1, len(images)), sink=0)  # every image is memory
    bank.add_references(images, story_id=shot_id, embedder=embedder)
    return bank


def render_single_shot(pipeline, scorers, base_config: RenderConfig, root: str, scope: str,
                       request: ShotRequest, memory: list[np.ndarray],
                       first_frame: np.ndarray | None,
                       motion_frames: list[np.ndarray] | None) -> ShotResponse:
    """Plan, generate, select keyframes, write and describe one shot (runs in a thread)."""
    config = shot_config(base_config, request)
    step = ShotStep(pipeline, scorers, config)
    mode = resolve_mode(request.mode, first_frame is not None, motion_frames is not None,
                        step.has_t2v)
    if config.frames_for_mode(mode) < 1:
        raise ServeRequestError(422, "invalid_sampling",
                                f"num_frames {config.num_frames} leaves no frame in mode {mode}")
    select = request.select_keyframes and scorers is not None
    shot_id = new_shot_id()
    spec = ShotSpec(scene=SINGLE_SHOT_SCENE, shot=SINGLE_SHOT_NUMBER, shot_index=0,
                    prompt=request.prompt, cut=True)
    clock = Stopwatch()
    bank = memory_bank(memory, shot_id, step.reference_embedder() if select else None)
    plan = step.plan(request.prompt, mode, request.seed, bank)
    given = [first_frame] if first_frame is not None else motion_frames
    # new keyframes must not duplicate the given memory images
    stored = bank.stored_embeddings(include_references=True) if select and memory else None
    folder = shot_folder(root, scope, shot_id)
    shot = step.render(plan, folder, spec, story_id=shot_id, story_name="", bank=bank,
                       given=given_frames_of(given), select=select, stored_embeddings=stored,
                       where=f"shot {shot_id}", clock=clock)
    return shot_response(shot_id, shot.record, shot.selected, folder, len(plan.memory),
                         request.return_video, config.sampling_preset)


def shot_response(shot_id: str, record, selected, folder: str, memory_count: int,
                  return_video: str, sampling_preset: str = "standard") -> ShotResponse:
    keyframes = []
    for entry, score in zip(selected.entries, selected.scores):
        png = image_png(entry.image)  # the bytes ShotStep.write stored
        keyframes.append(KeyframeOut(
            frame_index=entry.frame_index, keyframe_id=entry.keyframe_id, score=score,
            image_uri=storage.join(folder, layout.keyframe_key(entry.keyframe_id)),
            image_base64=base64.b64encode(png).decode("ascii")))
    video_base64 = None
    if return_video in ("base64", "both"):
        video_base64 = base64.b64encode(storage.read_bytes(
            record.video_uri, max_bytes=MAX_STORED_VIDEO_BYTES)).decode("ascii")
    return ShotResponse(
        shot_id=shot_id, mode=record.mode, seed=record.seed, num_frames=record.num_frames,
        height=record.height, width=record.width, fps=record.fps,
        video_uri=record.video_uri if return_video in ("uri", "both") else None,
        video_base64=video_base64, video_sha256=record.video_sha256, keyframes=keyframes,
        memory_count=memory_count, model_id=record.model_id, lora_id=record.lora_id,
        sampling_preset=sampling_preset, model_evaluations=record.model_evaluations,
        timings_s={"generate": record.generate_seconds, "select": record.select_seconds,
                   "write": record.write_seconds, "denoise": record.denoise_seconds})
