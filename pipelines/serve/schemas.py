"""JSON request and response bodies of the Serve endpoint (they make the OpenAPI schema).

Field constraints here are the fixed ones (types, enums, non-empty); the configurable
limits (prompt length, image count and size, frames, steps, resolution) are checked against
`ServeLimits` in the handlers so each violation names its limit. Modes are `ShotMode`
values and transitions the RenderConfig's; responses are built from the typed records the
deployments return (`ShotRecord`, `SessionRecord`, `StoryJob`) by the `of(...)`
constructors here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.serve.jobs import JobStatus
from storymem_model.records import ShotRecord
from storymem_model.shot_modes import ShotMode
from storymem_model.specs import TRANSITIONS

MAX_SEED = 2**32 - 1
AUTO_MODE = "auto"
# The modes a single-shot request may ask for (ShotMode values); "auto" picks mi2v with a
# first frame, mm2v with motion frames, else m2v.
REQUEST_MODES = (AUTO_MODE,) + tuple(m.value for m in (ShotMode.T2V, ShotMode.M2V,
                                                       ShotMode.MI2V, ShotMode.MM2V))

ImageSpec = str
ImageSpecDoc = ("an image: base64 (standard or URL-safe), a data URI "
                "`data:image/png;base64,...`, or a storage URI under the server's allowed "
                "prefixes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SAMPLING_PRESET_DOC = ("the sampling preset: standard (the reference, 40 guided steps) or fast "
                       "(4 guidance-free steps, for a server with a step-distillation LoRA); "
                       "the server's own when null. Its values replace the server's M2V "
                       "sampling; `sampling` overrides apply on top")


class ShotSampling(_Strict):
    """Bounded per-request overrides of the server's sampling and geometry defaults."""

    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0)
    guidance_scale_2: float | None = Field(None, ge=0.0)
    shift: float | None = Field(None, gt=0.0, le=100.0)
    height: int | None = Field(None, ge=16, multiple_of=16)
    width: int | None = Field(None, ge=16, multiple_of=16)
    num_frames: int | None = Field(None, ge=5, description="4k+1 frames, e.g. 17 or 81")


class ShotRequest(_Strict):
    prompt: str = Field(..., min_length=1, description="the shot's text prompt")
    negative_prompt: str | None = None
    memory_images: list[ImageSpec] | None = Field(
        None, description=f"memory keyframes conditioning the shot (M2V); each is {ImageSpecDoc}")
    first_frame: ImageSpec | None = Field(None, description="first frame (MI2V)")
    motion_frames: list[ImageSpec] | None = Field(
        None, description="exactly 5 leading frames (MM2V)")
    mode: Literal[REQUEST_MODES] = Field(
        AUTO_MODE, description="auto: mi2v with first_frame, mm2v with motion_frames, else m2v")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    sampling_preset: Literal["standard", "fast"] | None = Field(None, description=SAMPLING_PRESET_DOC)
    sampling: ShotSampling = Field(default_factory=ShotSampling)
    return_video: Literal["uri", "base64", "both"] = "both"
    select_keyframes: bool = True


class KeyframeOut(BaseModel):
    frame_index: int
    keyframe_id: str | None = None
    score: float | None = None
    image_base64: str | None = None
    image_uri: str | None = None


class ShotResponse(BaseModel):
    shot_id: str
    mode: ShotMode
    seed: int
    num_frames: int
    height: int
    width: int
    fps: int
    video_uri: str | None = None
    video_base64: str | None = None
    video_sha256: str
    keyframes: list[KeyframeOut]
    memory_count: int
    model_id: str
    lora_id: str | None = None
    sampling_preset: str = "standard"
    model_evaluations: int = Field(0, description="transformer evaluations x batch (what the "
                                                  "shot cost: 80 for 40 guided steps, 4 fast)")
    timings_s: dict[str, float]


class SessionCreate(_Strict):
    reference_images: list[ImageSpec] | None = Field(
        None, description=f"initial memory (MR2V); each is {ImageSpecDoc}")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="story seed; each shot's seed derives from it")
    transition: Literal[TRANSITIONS] | None = Field(
        None, description="how non-cut shots continue the previous one (server default when null)")
    sampling_preset: Literal["standard", "fast"] | None = Field(None, description=SAMPLING_PRESET_DOC)
    name: str | None = Field(None, max_length=200)


class SessionShotRequest(_Strict):
    prompt: str = Field(..., min_length=1)
    cut: bool = Field(True, description="false: continue from the previous shot (MI2V/MM2V)")
    new_scene: bool = Field(False, description="start a new scene with this shot")
    first_frame_prompt: str | None = None
    return_video: Literal["uri", "base64", "both"] = "both"


class SessionShotOut(BaseModel):
    scene: int
    shot: int
    shot_index: int
    prompt: str
    cut: bool
    mode: ShotMode
    seed: int
    num_frames: int
    video_uri: str
    video_sha256: str
    memory_keyframe_ids: list[str]
    selected_keyframe_ids: list[str]
    model_evaluations: int = 0

    @classmethod
    def of(cls, record: ShotRecord) -> "SessionShotOut":
        return cls(scene=record.scene, shot=record.shot, shot_index=record.shot_index,
                   prompt=record.prompt, cut=record.cut, mode=record.mode, seed=record.seed,
                   num_frames=record.num_frames, video_uri=record.video_uri,
                   video_sha256=record.video_sha256,
                   memory_keyframe_ids=list(record.memory_keyframe_ids),
                   selected_keyframe_ids=list(record.keyframe_ids),
                   model_evaluations=record.model_evaluations)


class MemoryEntryOut(BaseModel):
    keyframe_id: str
    scene: int | None = None
    shot: int | None = None
    frame_index: int | None = None

    @classmethod
    def of(cls, entry) -> "MemoryEntryOut":
        """From a memory entry (`sessions.MemoryEntry` or a bank's `KeyframeEntry`)."""
        return cls(keyframe_id=entry.keyframe_id, scene=entry.scene, shot=entry.shot,
                   frame_index=entry.frame_index)


class SessionOut(BaseModel):
    session_id: str
    name: str | None = None
    created_at: float
    seed: int
    transition: str
    config_hash: str
    shots: list[SessionShotOut]
    memory: list[MemoryEntryOut]

    @classmethod
    def of(cls, record) -> "SessionOut":
        """The public view of a `sessions.SessionRecord` (no scope, no internal config)."""
        return cls(session_id=record.session_id, name=record.name,
                   created_at=record.created_at, seed=record.config.seed,
                   transition=record.config.transition, config_hash=record.config_hash,
                   shots=[SessionShotOut.of(r) for r in record.shots],
                   memory=[MemoryEntryOut.of(m) for m in record.memory])


class SessionShotResponse(BaseModel):
    session_id: str
    shot: SessionShotOut
    memory: list[MemoryEntryOut]
    video_base64: str | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, record, shot: ShotRecord, video_base64: str | None = None
           ) -> "SessionShotResponse":
        """The answer to a session shot: `record` is the session after it."""
        return cls(session_id=record.session_id, shot=SessionShotOut.of(shot),
                   memory=[MemoryEntryOut.of(m) for m in record.memory],
                   video_base64=video_base64,
                   timings_s={"generate": shot.generate_seconds,
                              "select": shot.select_seconds, "write": shot.write_seconds})


class StoryRequest(_Strict):
    script: dict | list = Field(
        ..., description="an ST-Bench style script object, or a plain list of shot prompts")
    name: str | None = Field(None, max_length=200, description="label when the script has no story_name")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="story seed (server default when null)")
    transition: Literal[TRANSITIONS] | None = None
    sampling_preset: Literal["standard", "fast"] | None = Field(None, description=SAMPLING_PRESET_DOC)


class StoryShotOut(BaseModel):
    scene: int
    shot: int
    mode: ShotMode
    video_uri: str
    video_sha256: str


class StoryOutputsOut(BaseModel):
    story_uri: str
    video_uri: str
    shots_parquet_uri: str
    commit_marker_uri: str
    shots: list[StoryShotOut]


class StoryJobOut(BaseModel):
    job_id: str
    status: JobStatus
    story_id: str
    config_hash: str
    shots_total: int
    shots_done: int
    created_at: float
    updated_at: float
    error: str | None = None
    outputs: StoryOutputsOut | None = None


class ErrorOut(BaseModel):
    error: str
    detail: str
    limit: str | None = Field(None, description="the limit or quota a request went over")
    maximum: float | int | None = None
    got: float | int | str | None = None
    problems: list[str] | None = Field(None, description="invalid_script: up to 20 problems")
    problem_count: int | None = Field(None, description="invalid_script: all problems found")
    request_id: str | None = Field(None, description="internal_error: the id the server "
                                                     "logged the failure under")
