"""JSON request and response bodies of the Serve endpoint (they make the OpenAPI schema).

Field constraints here are the fixed ones (types, enums, non-empty); the configurable
limits (prompt length, image count and size, frames, steps, resolution) are checked against
`ServeLimits` in the handlers so each violation names its limit.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1

ImageSpec = str
ImageSpecDoc = ("an image: base64 (standard or URL-safe), a data URI "
                "`data:image/png;base64,...`, or a storage URI under the server's allowed "
                "prefixes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingOverrides(_Strict):
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
    mode: Literal["auto", "t2v", "m2v", "mi2v", "mm2v"] = Field(
        "auto", description="auto: mi2v with first_frame, mm2v with motion_frames, else m2v")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    sampling: SamplingOverrides = Field(default_factory=SamplingOverrides)
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
    mode: str
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
    timings_s: dict[str, float]


class SessionCreate(_Strict):
    reference_images: list[ImageSpec] | None = Field(
        None, description=f"initial memory (MR2V); each is {ImageSpecDoc}")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="story seed; each shot's seed derives from it")
    transition: Literal["mi2v", "mm2v", "none"] | None = Field(
        None, description="how non-cut shots continue the previous one (server default when null)")
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
    mode: str
    seed: int
    num_frames: int
    video_uri: str
    video_sha256: str
    memory_keyframe_ids: list[str]
    selected_keyframe_ids: list[str]


class MemoryEntryOut(BaseModel):
    keyframe_id: str
    scene: int | None = None
    shot: int | None = None
    frame_index: int | None = None


class SessionOut(BaseModel):
    session_id: str
    name: str | None = None
    created_at: float
    seed: int
    transition: str
    config_hash: str
    shots: list[SessionShotOut]
    memory: list[MemoryEntryOut]


class SessionShotResponse(BaseModel):
    session_id: str
    shot: SessionShotOut
    memory: list[MemoryEntryOut]
    video_base64: str | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)


class StoryRequest(_Strict):
    script: dict | list = Field(
        ..., description="an ST-Bench style script object, or a plain list of shot prompts")
    name: str | None = Field(None, max_length=200, description="label when the script has no story_name")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="story seed (server default when null)")
    transition: Literal["mi2v", "mm2v", "none"] | None = None


class StoryJobOut(BaseModel):
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    story_id: str
    config_hash: str
    shots_total: int
    shots_done: int
    created_at: float
    updated_at: float
    error: str | None = None
    outputs: dict | None = None


class ErrorOut(BaseModel):
    error: str
    detail: str
    limit: str | None = None
    maximum: float | int | None = None
    got: float | int | None = None
