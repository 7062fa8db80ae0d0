"""The specs every layer passes down: which model, which keyframe scorers, which settings.

They are built once, at the edge (command-line flags, Prefect flow parameters, server
settings), frozen, validated on construction and JSON-serialisable (`spec_json.Spec`).
Nothing here loads weights or imports torch:

* `ModelSpec`: the Wan2.2 model (the `tiny` preset or local folders), its StoryMem LoRA and
  where it runs (device, dtype, offload). `resolved()` fills the device and dtype.
* `ScorerSpec`: the keyframe scorers (CLIP similarity and a quality gate: the LAION
  aesthetic predictor or HPSv3), the tiny preset or local checkpoint files.
* `RenderSettings`: the method and sampling choices of a render (transition, seed, memory
  policy, RoPE shift, keyframe selection, sampling overrides, reference images).

`storymem_model.render_spec.resolve_render_spec` turns the three into a `RenderSpec` holding
the resolved `RenderConfig` (every pixel-changing value, hence the config hash), still
without loading any weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from storymem_model.keyframe_preprocess import MODES as KEYFRAME_PREPROCESS
from storymem_model.sampling import SAMPLING_PRESETS, SamplingConfig
from storymem_model.shot_modes import TRANSITIONS
from storymem_model.spec_json import Spec, check_choice, check_number

PRESETS = ("tiny",)
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OFFLOAD_MODES = ("model", "sequential", "group")
STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2")
STORAGE_DTYPE_ALIASES = {"fp8": "float8_e4m3fn"}
ATTENTION_BACKENDS = ("native", "flash", "sage")
REFERENCE_CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI CLIP ViT-B/32, as the reference uses
AESTHETIC_CLIP_MODEL = "ViT-L-14-quickgelu"  # the LAION predictor's CLIP


def canonical_dtype(dtype: str | None) -> str | None:
    """'bf16' -> 'bfloat16' etc.; None stays None (resolved later from the device)."""
    if dtype is None:
        return None
    return DTYPE_ALIASES.get(str(dtype), str(dtype))


@dataclass(frozen=True)
class ModelSpec(Spec):
    """The video model: `preset="tiny"` or a Wan2.2 I2V-A14B folder, plus LoRA and placement.

    model_dir: diffusers layout (`transformer/`, `transformer_2/`, `vae/`, ...) or the
        original layout (`high_noise_model/`, `low_noise_model/`; then `components_dir` is
        a diffusers-layout folder supplying the VAE, text encoder and tokenizer).
    t2v_model_dir: a Wan2.2 T2V-A14B folder for text-only first shots (optional).
    lora_dir: a folder with backbone_high_noise.* and backbone_low_noise.* (the StoryMem
        LoRA pair); lora_strength multiplies its rsLoRA scale.
    distill_lora_dir: a step-distillation LoRA pair for the two M2V experts (the Wan2.2
        I2V-A14B Lightning / LightX2V releases), stacked on the StoryMem LoRA with its own
        strength; use with the `fast` sampling preset.
    device / dtype: None until `resolved()`: cuda + bfloat16 with an accelerator, else
        cpu + float32. offload: None, "model", "sequential" or "group" (needs an
        accelerator). storage_dtype: keep transformer weights in fp8 (float8_e4m3fn) and
        compute in `dtype` (diffusers layerwise casting). attention_backend: diffusers'
        attention dispatcher (native, flash, sage). compile: torch.compile each
        transformer block (regional compilation).
    """

    preset: str | None = None
    model_dir: str | None = None
    components_dir: str | None = None
    t2v_model_dir: str | None = None
    lora_dir: str | None = None
    lora_strength: float = 1.0
    distill_lora_dir: str | None = None
    distill_lora_strength: float = 1.0
    device: str | None = None
    dtype: str | None = None
    offload: str | None = None
    storage_dtype: str | None = None
    attention_backend: str = "native"
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.storage_dtype is not None:
            object.__setattr__(self, "storage_dtype", STORAGE_DTYPE_ALIASES.get(
                str(self.storage_dtype), self.storage_dtype))
        super().__post_init__()

    def problems(self) -> list[str]:
        out: list[str] = []
        if (self.preset is None) == (self.model_dir is None):
            out.append("give exactly one of preset (tiny) or model_dir (a Wan2.2 folder)")
        if self.preset is not None:
            check_choice(out, "preset", self.preset, PRESETS)
            for name in ("components_dir", "t2v_model_dir"):
                if getattr(self, name) is not None:
                    out.append(f"{name} is for real model folders; the {self.preset} preset "
                               "builds every component itself")
        for name in ("model_dir", "components_dir", "t2v_model_dir", "lora_dir",
                     "distill_lora_dir", "device"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                out.append(f"{name} must be a non-empty string, got {value!r}")
        check_number(out, "lora_strength", self.lora_strength)
        check_number(out, "distill_lora_strength", self.distill_lora_strength)
        if self.storage_dtype is not None:
            check_choice(out, "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        check_choice(out, "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if not isinstance(self.compile, bool):
            out.append(f"compile must be true or false, got {self.compile!r}")
        if self.dtype is not None:
            check_choice(out, "dtype", self.dtype, DTYPES)
        if self.offload is not None:
            check_choice(out, "offload", self.offload, OFFLOAD_MODES)
            if isinstance(self.device, str) and self.device.startswith("cpu"):
                out.append("offload moves weights between the CPU and an accelerator; it "
                           "needs device cuda")
        return out

    @property
    def is_resolved(self) -> bool:
        return self.device is not None and self.dtype is not None

    def resolved(self, accelerator: bool) -> "ModelSpec":
        """The spec with device and dtype filled: `accelerator` says whether the host that
        will run the model has a GPU (the edge decides: torch.cuda.is_available() for a
        local run, gpus_per_worker > 0 for Ray workers)."""
        device = self.device or ("cuda" if accelerator else "cpu")
        dtype = self.dtype or ("float32" if device.startswith("cpu") else "bfloat16")
        return self.replace(device=device, dtype=dtype)


@dataclass(frozen=True)
class ScorerSpec(Spec):
    """Keyframe scorers: CLIP (similarity) and a quality gate (aesthetic or HPSv3).

    `preset="tiny"`: the tiny random CLIP and aesthetic head. Otherwise local files:
    clip_checkpoint (ViT-B/32) and either the LAION aesthetic predictor (aesthetic_head on
    CLIP ViT-L/14 from aesthetic_clip_checkpoint) or HPSv3 (hps_checkpoint on the Qwen2-VL
    folder hps_base_model, run in the separate HPS environment `hps_python`). HPSv3 may
    also stand beside the tiny CLIP. gate_threshold None = the gate's documented default.
    keyframe_preprocess: "reference" (the reference release's path: frames resized to the
    Qwen2-VL smart-resize size, the gate scores those, CLIP gets them squashed to its input
    size, bilinear without antialias) or "direct" (each scorer resizes full frames itself).
    """

    preset: str | None = None
    clip_checkpoint: str | None = None
    clip_model: str = REFERENCE_CLIP_MODEL
    aesthetic_head: str | None = None
    aesthetic_clip_checkpoint: str | None = None
    aesthetic_clip_model: str = AESTHETIC_CLIP_MODEL
    hps_checkpoint: str | None = None
    hps_base_model: str | None = None
    hps_python: str | None = None
    gate_threshold: float | None = None
    keyframe_preprocess: str = "reference"
    device: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        check_choice(out, "keyframe_preprocess", self.keyframe_preprocess, KEYFRAME_PREPROCESS)
        if self.preset is not None:
            check_choice(out, "preset", self.preset, PRESETS)
            for name in ("clip_checkpoint", "aesthetic_head", "aesthetic_clip_checkpoint"):
                if getattr(self, name) is not None:
                    out.append(f"{name} is a real scorer file; the {self.preset} preset builds "
                               "its own CLIP and aesthetic head")
        elif not self.clip_checkpoint:
            out.append("real keyframe scorers need clip_checkpoint (a local CLIP ViT-B/32 "
                       "weights file)")
        if bool(self.hps_checkpoint) != bool(self.hps_base_model):
            out.append("the HPSv3 gate needs both hps_checkpoint and hps_base_model")
        if bool(self.aesthetic_head) != bool(self.aesthetic_clip_checkpoint):
            out.append("the aesthetic gate needs both aesthetic_head and "
                       "aesthetic_clip_checkpoint")
        check_number(out, "gate_threshold", self.gate_threshold, optional=True)
        return out

    @property
    def uses_hps(self) -> bool:
        return bool(self.hps_checkpoint)

    @property
    def has_gate(self) -> bool:
        """Whether a quality gate is named (tiny always has its aesthetic head); a spec
        without one serves only CLIP embeddings (e.g. for evaluation)."""
        return self.preset is not None or self.uses_hps or bool(self.aesthetic_head)

    def problems_for_keyframes(self) -> list[str]:
        """What keyframe selection would miss (it needs a gate)."""
        if self.has_gate:
            return []
        return ["no quality gate: give aesthetic_head and aesthetic_clip_checkpoint (the "
                "LAION aesthetic predictor) or hps_checkpoint and hps_base_model"]

    def with_device(self, device: str | None) -> "ScorerSpec":
        return self if self.device or device is None else self.replace(device=device)


@dataclass(frozen=True)
class SamplingOverrides(Spec):
    """Sampling values to change from the model's defaults (None keeps the default)."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    shift: float | None = None
    boundary_ratio: float | None = None
    reference_sigmas: bool | None = None
    cfg_mode: str | None = None
    solver: str | None = None
    step_list: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.step_list is not None:
            object.__setattr__(self, "step_list", tuple(self.step_list))
        super().__post_init__()

    def problems(self) -> list[str]:
        """The overrides over the standard sampling must make a usable schedule (the one
        check of sampling values, `SamplingConfig.problems`)."""
        try:
            SamplingConfig().updated(**self.given())
        except ValueError as exc:
            return [str(exc)]
        return []

    def given(self) -> dict:
        """Only the values that were set (a step list as a list, as configs store it)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}


@dataclass(frozen=True)
class RenderSettings(Spec):
    """The method and sampling choices of a render; model defaults fill the rest.

    memory=False renders every shot on its own (the paper's independent-shots baseline):
    no memory, no transitions (transition is then "none"), no keyframe selection, so no
    keyframe scorers are needed. `sampling` overrides the M2V/MR2V/MI2V/MM2V sampling;
    T2V shots keep the T2V defaults plus the shared keys (steps, cfg_mode,
    reference_sigmas) of `sampling`, plus `t2v_sampling`. `sampling_preset` picks the M2V
    sampling the overrides start from: "standard" (the reference: 40 steps with guidance)
    or "fast" (4 guidance-free steps for a step-distillation LoRA). `fix_mem`: memory
    frames after the first `fix_mem` get mask value 2 (None: all 1, as the reference story
    pipeline). `references` are URIs of MR2V reference images (the story's initial memory).
    """

    transition: str = "mi2v"
    seed: int = 0
    memory: bool = True
    max_memory: int = 10
    memory_sink: int = 3
    rope_shift: int | None = 5
    prompt_aware_memory: bool = False
    negative_prompt: str | None = None
    keyframe_threshold: float = 0.9
    max_keyframes: int = 3
    fix_mem: int | None = None
    sampling_preset: str = "standard"
    sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    t2v_sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", tuple(self.references))
        if self.rope_shift == 0:
            object.__setattr__(self, "rope_shift", None)  # 0 and None: contiguous positions
        if self.memory is False and self.transition != "none":
            object.__setattr__(self, "transition", "none")  # no transitions without memory
        super().__post_init__()

    def problems(self) -> list[str]:
        out: list[str] = []
        check_choice(out, "transition", self.transition, TRANSITIONS)
        check_number(out, "seed", self.seed, minimum=0, integer=True)
        if not isinstance(self.memory, bool):
            out.append(f"memory must be true or false, got {self.memory!r}")
        elif not self.memory and self.references:
            out.append("memory off renders every shot without memory; it cannot use reference "
                       "images (the MR2V initial memory)")
        check_number(out, "max_memory", self.max_memory, minimum=1, integer=True)
        check_number(out, "memory_sink", self.memory_sink, minimum=0, integer=True)
        check_number(out, "rope_shift", self.rope_shift, minimum=0, integer=True,
                     optional=True)
        check_number(out, "keyframe_threshold", self.keyframe_threshold, above=0, maximum=1)
        check_number(out, "max_keyframes", self.max_keyframes, minimum=1, integer=True)
        check_number(out, "fix_mem", self.fix_mem, minimum=0, integer=True, optional=True)
        check_choice(out, "sampling_preset", self.sampling_preset, SAMPLING_PRESETS)
        for name in ("height", "width", "num_frames"):
            check_number(out, name, getattr(self, name), minimum=1, integer=True,
                         optional=True)
        if not all(isinstance(r, str) and r for r in self.references):
            out.append("references must be image paths or URIs")
        return out
