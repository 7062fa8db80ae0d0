"""RenderConfig: every setting that changes the pixels of a rendered story, and its hash.

A story's outputs live under ``{out}/{story_id}/{config_hash}/``: the same script rendered
with the same config always lands in the same folder (so a rerun resumes or skips it) and
any change that could alter a pixel (model or LoRA, transition, seed, memory policy, RoPE
shift, sampling, T2V sampling, size, frames, fps, keyframe selection, scorers, reference
images, prompt-aware memory, memory on/off, dtype) lands in a new one. Settings that do not change pixels (device,
output URI, progress display) are not part of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from storymem_model.keyframe_preprocess import MODES as KEYFRAME_PREPROCESS
from storymem_model.sampling import (SAMPLING_KEYS, SAMPLING_PRESETS, SamplingConfig,
                                     preset_sampling, with_implied_steps)
from storymem_model.shot_modes import TRANSITIONS, ShotMode
from storymem_model.spec_json import Spec, SpecError, check_choice

CONFIG_HASH_CHARS = 12
# bump when the meaning of a field changes (2: T2V shots use t2v_sampling; 3: content ids,
# T2V guidance 3.5/3.5, keyframe preprocessing, fix_mem, sampling presets, kernels)
CONFIG_FORMAT = 3
# User sampling overrides that also apply to T2V shots. Shift, boundary and guidance are
# tuned per expert pair (M2V: 4.0 / 0.9, T2V: 12.0 / 0.875), so M2V overrides of those
# never leak into T2V shots; give them through `t2v_sampling=` instead.
T2V_SHARED_SAMPLING_KEYS = ("num_inference_steps", "cfg_mode", "reference_sigmas")


class ConfigError(SpecError):
    """A render setting that cannot be used, naming the setting."""


@dataclass(frozen=True)
class RenderConfig(Spec):
    # model
    model_id: str
    lora_id: str | None = None
    t2v_model_id: str | None = None
    dtype: str = "float32"
    distill_lora_id: str | None = None  # a step-distillation LoRA pair stacked on both experts
    storage_dtype: str | None = None  # weights stored as e.g. float8_e4m3fn, computed in dtype
    attention_backend: str = "native"  # diffusers' attention dispatcher backend
    compiled: bool = False  # torch.compile of the transformer blocks (kernels may differ)
    # method
    transition: str = "mi2v"
    seed: int = 0
    max_memory: int = 10
    memory_sink: int = 3
    rope_shift: int | None = 5
    prompt_aware_memory: bool = False
    negative_prompt: str | None = None
    # False: every shot on its own (the "independent shots" baseline): no memory, no
    # transitions, no keyframe selection; modes "t2v" or "m2v-no-memory".
    memory: bool = True
    # memory frames after the first `fix_mem` get mask value 2 (None: all 1, the reference)
    fix_mem: int | None = None
    # sampling and output geometry; `sampling_preset` names where `sampling` started from; `sampling` is for M2V/MR2V/MI2V/MM2V shots,
    # `t2v_sampling` for T2V shots (the T2V experts' defaults plus shared overrides)
    sampling_preset: str = "standard"
    sampling: dict = field(default_factory=dict)
    t2v_sampling: dict = field(default_factory=dict)
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    # keyframe selection (docs/method.md#keyframes); `keyframe_preprocess`: "reference"
    # (Qwen2-VL smart-resize, CLIP squash bilinear) or "direct" (each scorer's own resize)
    keyframe_preprocess: str = "reference"
    keyframe_threshold: float = 0.9
    keyframe_step: float = 0.01
    max_keyframes: int = 3
    gate_threshold: float = 3.0
    duplicate_threshold: float = 0.9
    embedder_id: str = ""
    gate_id: str = ""
    # MR2V reference images (sha256 of their decoded RGB pixels + shape), in order
    references_sha256: tuple[str, ...] = ()

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        object.__setattr__(self, "sampling", dict(sorted(self.sampling.items())))
        object.__setattr__(self, "t2v_sampling", dict(sorted(self.t2v_sampling.items())))
        object.__setattr__(self, "references_sha256", tuple(self.references_sha256))

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.model_id, str) or not self.model_id:
            out.append("model_id must be a non-empty string")
        check_choice(out, "transition", self.transition, TRANSITIONS)
        if not isinstance(self.seed, int) or self.seed < 0:
            out.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.max_memory < 1:
            out.append(f"max_memory must be at least 1, got {self.max_memory}")
        if self.memory_sink < 0 or self.memory_sink > self.max_memory:
            out.append(f"memory_sink must be between 0 and max_memory ({self.max_memory}), "
                       f"got {self.memory_sink}")
        if self.rope_shift is not None and self.rope_shift < 0:
            out.append(f"rope_shift must be >= 0 or None, got {self.rope_shift}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                out.append(f"{name} must be a positive multiple of 16, got {value}")
        if self.num_frames < 5 or (self.num_frames - 1) % 4:
            out.append(f"num_frames must be 4k+1 and at least 5 (e.g. 17, 81), "
                       f"got {self.num_frames}")
        elif self.transition in (ShotMode.MI2V, ShotMode.MM2V) and \
                self.frames_for_mode(self.transition) < 1:
            out.append(f"transition {self.transition} drops "
                       f"{ShotMode(self.transition).given_frames} conditioned frames; "
                       f"num_frames {self.num_frames} leaves nothing")
        if self.fps < 1:
            out.append(f"fps must be positive, got {self.fps}")
        for name in ("sampling", "t2v_sampling"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                out.append(f"{name} must be a dict, got {type(value).__name__}")
                continue
            unknown = sorted(set(value) - set(SAMPLING_KEYS))
            if unknown:
                out.append(f"unknown {name} keys {unknown}; known: {', '.join(SAMPLING_KEYS)}")
                continue
            try:  # the values together must make a usable schedule
                SamplingConfig().updated(**value)
            except (TypeError, ValueError) as exc:
                out.append(f"{name}: {exc}")
        if not isinstance(self.memory, bool):
            out.append(f"memory must be True or False, got {self.memory!r}")
        elif not self.memory and self.references_sha256:
            out.append("memory=False renders every shot without memory, so reference images "
                       "(the MR2V initial memory) cannot be used with it")
        if self.fix_mem is not None and (isinstance(self.fix_mem, bool)
                                         or not isinstance(self.fix_mem, int) or self.fix_mem < 0):
            out.append(f"fix_mem must be None or an integer >= 0, got {self.fix_mem!r}")
        check_choice(out, "sampling_preset", self.sampling_preset, SAMPLING_PRESETS)
        check_choice(out, "keyframe_preprocess", self.keyframe_preprocess, KEYFRAME_PREPROCESS)
        if not 0.0 < self.keyframe_threshold <= 1.0:
            out.append(f"keyframe_threshold must be in (0, 1], got {self.keyframe_threshold}")
        if not self.keyframe_step > 0:
            out.append(f"keyframe_step must be positive, got {self.keyframe_step}")
        if self.max_keyframes < 1:
            out.append(f"max_keyframes must be at least 1, got {self.max_keyframes}")
        return out

    # ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RenderConfig":
        """A config read back (older configs without the newer fields get their defaults)."""
        if isinstance(data, dict):
            unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ConfigError(f"unknown RenderConfig fields {unknown}")
        return super().from_dict(data)

    def config_hash(self) -> str:
        """Short sha256 of the canonical JSON of every field (and the format version)."""
        blob = json.dumps({"format": CONFIG_FORMAT, **self.to_dict()}, sort_keys=True,
                          separators=(",", ":"), default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:CONFIG_HASH_CHARS]

    def frames_for_mode(self, mode: ShotMode | str) -> int:
        """Frames a shot of this mode saves (its given frames are dropped)."""
        return self.num_frames - ShotMode(mode).given_frames

    @classmethod
    def for_pipeline(cls, pipeline, scorers=None, **choices) -> "RenderConfig":
        """A config filled from a loaded pipeline (ids, size, frames, fps, sampling) and
        scorers (ids, gate threshold); `choices` override any field (pass
        `keyframe_preprocess=` when the scorers were built for "direct"). Sampling choices are
        merged over the pipeline's M2V defaults (`default_sampling`). T2V sampling (only
        when the pipeline has T2V experts) is its `default_t2v_sampling`, plus the sampling
        choices in T2V_SHARED_SAMPLING_KEYS, plus `t2v_sampling=` choices."""
        has_t2v = bool(getattr(pipeline, "has_t2v", False))
        sampling_defaults = dict(getattr(pipeline, "default_sampling", {}) or {})
        preset = choices.get("sampling_preset") or "standard"
        if preset != "standard":
            steps = sampling_defaults.get("num_inference_steps", 40)
            sampling_defaults = preset_sampling(preset, steps).as_dict()
        defaults = ModelDefaults(
            model_id=pipeline.model_id, lora_id=getattr(pipeline, "lora_id", None),
            t2v_model_id=getattr(pipeline, "t2v_model_id", None) or (
                f"{pipeline.model_id}:t2v" if has_t2v else None),
            dtype=str(getattr(pipeline, "compute_dtype", None) or getattr(pipeline, "dtype", "float32")
                      ).replace("torch.", ""),
            height=int(pipeline.default_height), width=int(pipeline.default_width),
            num_frames=int(pipeline.default_num_frames), fps=int(pipeline.fps),
            sampling=sampling_defaults,
            t2v_sampling=dict(getattr(pipeline, "default_t2v_sampling", None) or {})
            if has_t2v else None,
            distill_lora_id=getattr(pipeline, "distill_lora_id", None),
            storage_dtype=getattr(pipeline, "storage_dtype", None),
            attention_backend=getattr(pipeline, "attention_backend", None) or "native",
            compiled=bool(getattr(pipeline, "compiled", False)))
        scorer_values = {}
        if scorers is not None:
            scorer_values = {"embedder_id": str(getattr(scorers.embedder, "name", "")),
                             "gate_id": str(getattr(scorers.gate, "name", "")),
                             "gate_threshold": float(scorers.gate_threshold)}
        return cls.assemble(defaults, choices.pop("sampling", None),
                            choices.pop("t2v_sampling", None), **scorer_values, **choices)

    @classmethod
    def assemble(cls, defaults: "ModelDefaults", sampling: dict | None = None,
                 t2v_sampling: dict | None = None, **choices) -> "RenderConfig":
        """The one place a config is put together: the model's defaults, the sampling
        overrides merged over them (M2V; T2V keeps its own defaults and takes only the
        shared keys of `sampling`, plus `t2v_sampling`), then any other field's choice
        (None keeps the default)."""
        overrides = {k: v for k, v in (sampling or {}).items() if v is not None}
        merged = {k: v for k, v in defaults.sampling.items() if k in SAMPLING_KEYS}
        merged.update(with_implied_steps(overrides))
        t2v_choices = {k: v for k, v in (t2v_sampling or {}).items() if v is not None}
        t2v_merged: dict[str, Any] = {}
        if defaults.t2v_sampling is not None:
            t2v_merged = {k: v for k, v in defaults.t2v_sampling.items() if k in SAMPLING_KEYS}
            t2v_merged.update({k: v for k, v in overrides.items()
                               if k in T2V_SHARED_SAMPLING_KEYS})
            t2v_merged.update(t2v_choices)
        elif t2v_choices:
            raise ConfigError("t2v_sampling given, but the pipeline has no T2V experts")
        values: dict[str, Any] = {
            "model_id": defaults.model_id, "lora_id": defaults.lora_id,
            "t2v_model_id": defaults.t2v_model_id, "dtype": defaults.dtype,
            "distill_lora_id": defaults.distill_lora_id, "storage_dtype": defaults.storage_dtype,
            "attention_backend": defaults.attention_backend, "compiled": defaults.compiled,
            "height": defaults.height, "width": defaults.width,
            "num_frames": defaults.num_frames, "fps": defaults.fps,
            "sampling": merged, "t2v_sampling": t2v_merged,
        }
        values.update({k: v for k, v in choices.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model brings to a RenderConfig: its ids, dtype, shot geometry and sampling
    defaults (`t2v_sampling` None when it has no T2V experts). Known before loading
    (`render_spec.model_defaults`) and after (`RenderConfig.for_pipeline`)."""

    model_id: str
    lora_id: str | None
    t2v_model_id: str | None
    dtype: str
    height: int
    width: int
    num_frames: int
    fps: int
    sampling: dict
    t2v_sampling: dict | None
    distill_lora_id: str | None = None
    storage_dtype: str | None = None
    attention_backend: str = "native"
    compiled: bool = False
