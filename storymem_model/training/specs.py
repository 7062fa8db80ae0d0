"""The specs of training: `PrepareSpec` (clips -> prepared shards), `FitSpec` (shards -> a
LoRA pair) and `ValidationSpec` (what `--validate-every` renders).

Built once at the edge (`storymem train prepare|fit` flags, the `train_lora` flow's
parameters), frozen, validated on construction, JSON round-trippable (`spec_json.Spec`).
Ray workers and actors receive them (as dicts), never command-line arguments. Nothing here
imports torch or reads a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from storymem_model.evaluation.encoder_spec import VideoEncoderSpec
from storymem_model.spec_json import Spec, check_choice, check_number
from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

EXPERTS = ("high", "low", "both")
PARALLEL_MODES = ("fsdp", "ddp")
VAE_TEMPORAL_STRIDE = 4
SIZE_MULTIPLE = 16  # the pipeline's own rule for shot height and width


def _check_uri(problems: list[str], name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name} must be a non-empty path or URI, got {value!r}")


def _check_geometry(problems: list[str], height, width, num_frames, fps) -> None:
    for name, value in (("height", height), ("width", width)):
        check_number(problems, name, value, minimum=SIZE_MULTIPLE, integer=True)
        if isinstance(value, int) and not isinstance(value, bool) and value % SIZE_MULTIPLE:
            problems.append(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}")
    check_number(problems, "num_frames", num_frames, minimum=VAE_TEMPORAL_STRIDE + 1, integer=True)
    if isinstance(num_frames, int) and (num_frames - 1) % VAE_TEMPORAL_STRIDE:
        problems.append(f"num_frames must be 4k+1 (e.g. 17, 81), got {num_frames}")
    check_number(problems, "fps", fps, above=0)


def _check_workers(problems: list[str], workers, cpus_per_worker, gpus_per_worker) -> None:
    check_number(problems, "workers", workers, minimum=1, integer=True)
    check_number(problems, "cpus_per_worker", cpus_per_worker, above=0)
    check_number(problems, "gpus_per_worker", gpus_per_worker, minimum=0)


@dataclass(frozen=True)
class PrepareSpec(Spec):
    """Clips -> prepared training data (docs/training.md#preparation).

    clips: a JSONL or Parquet manifest (`clip_uri`, `caption`, optional `group_id`,
        `order`) or the dataset flow's output folder (its `data/split=*/*.parquet` rows:
        `video_uri`, `prompt`, `story_id`, `shot_index`).
    out: where shards, manifest and errors go (local or s3://).
    model: whose VAE and UMT5 encoder make the latents and caption embeddings (the
        experts trained later must be this model's).
    scorers: the CLIP (grouping by similarity, keyframe selection) and the quality gate
        (keyframe selection) - the render's keyframe scorers.
    height / width / num_frames / fps: the training shot geometry (clips are cropped to
        the aspect ratio, resized and resampled to it).
    group_threshold: clips without a group id join a group when their CLIP similarity to
        its first clip is at least this; max_group_size: clips per group at most.
    memory_candidates: memory latents kept per clip at most (keyframes of the other clips
        of its group, chosen by the memory-bank policy: sink + most recent).
    keyframe_threshold / max_keyframes: the keyframe selection of a render.
    rows_per_shard: clips per shard (whole groups stay in one shard).
    workers / cpus_per_worker / gpus_per_worker: Ray Data actors (a GPU each when > 0).
    max_clip_mb: clips larger than this are refused before they are read.
    ray_address: a Ray cluster to join; None starts an embedded local Ray.
    """

    clips: str
    out: str
    model: ModelSpec
    scorers: ScorerSpec
    height: int
    width: int
    num_frames: int
    fps: float = 16.0
    group_threshold: float = 0.9
    max_group_size: int = 8
    memory_candidates: int = 10
    memory_sink: int = 3
    keyframe_threshold: float = 0.9
    max_keyframes: int = 3
    rows_per_shard: int = 64
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_clip_mb: float = 1024.0
    ray_address: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        _check_uri(out, "clips", self.clips)
        _check_uri(out, "out", self.out)
        if self.model.lora_dir or self.model.distill_lora_dir:
            out.append("prepare encodes with the base model's VAE and text encoder; a LoRA "
                       "changes neither (leave lora_dir and distill_lora_dir unset)")
        out += [f"scorers: {p}" for p in self.scorers.problems_for_keyframes()]
        for name, device in (("model.device", self.model.device), ("scorers.device", self.scorers.device)):
            if isinstance(device, str) and device.startswith("cuda") and not (
                    isinstance(self.gpus_per_worker, (int, float)) and self.gpus_per_worker > 0):
                out.append(f"{name} {device} needs GPU workers (gpus_per_worker > 0)")
        _check_geometry(out, self.height, self.width, self.num_frames, self.fps)
        check_number(out, "group_threshold", self.group_threshold, minimum=-1, maximum=1)
        check_number(out, "max_group_size", self.max_group_size, minimum=1, integer=True)
        check_number(out, "memory_candidates", self.memory_candidates, minimum=0, integer=True)
        check_number(out, "memory_sink", self.memory_sink, minimum=0, integer=True)
        if isinstance(self.memory_sink, int) and isinstance(self.memory_candidates, int) \
                and self.memory_sink > self.memory_candidates:
            out.append(f"memory_sink ({self.memory_sink}) cannot exceed memory_candidates "
                       f"({self.memory_candidates})")
        check_number(out, "keyframe_threshold", self.keyframe_threshold, above=0, maximum=1)
        check_number(out, "max_keyframes", self.max_keyframes, minimum=1, integer=True)
        check_number(out, "rows_per_shard", self.rows_per_shard, minimum=1, integer=True)
        _check_workers(out, self.workers, self.cpus_per_worker, self.gpus_per_worker)
        check_number(out, "max_clip_mb", self.max_clip_mb, above=0)
        return out


@dataclass(frozen=True)
class ValidationSpec(Spec):
    """What `--validate-every` renders with the current LoRA: one fixed story script with
    these render settings and keyframe scorers, scored for cross-shot consistency by the
    video-text encoder (`storymem eval`'s metric)."""

    script: str
    settings: RenderSettings = field(default_factory=RenderSettings)
    scorers: ScorerSpec | None = None
    video_encoder: VideoEncoderSpec = field(
        default_factory=lambda: VideoEncoderSpec(kind="viclip", preset="tiny"))

    def problems(self) -> list[str]:
        out: list[str] = []
        _check_uri(out, "script", self.script)
        if self.settings.memory and self.scorers is None:
            out.append("rendering the validation story with memory needs keyframe scorers")
        return out


@dataclass(frozen=True)
class FitSpec(Spec):
    """Prepared data -> a StoryMem LoRA pair (docs/training.md#training).

    data: a prepared data set (`storymem train prepare --out`); out: where `lora/`,
        `metrics.parquet`, `training_card.json` and (by default) the checkpoints go.
    model: the base Wan2.2 I2V-A14B model whose experts are trained (no LoRA loaded).
    expert: high, low or both (both: the high-noise expert for `steps`, then the
        low-noise one for `steps`, in one run).
    lora_rank / lora_alpha: rsLoRA rank and alpha (None: the model's released rank, 128,
        or the tiny preset's; alpha None = rank).
    lr, warmup_steps, weight_decay, max_grad_norm, grad_accum: AdamW with linear warm-up,
        gradient clipping and accumulation (one sample per worker per micro-step).
    max_memory: memory latents per sample drawn uniformly from 0..max_memory (as many as
        the clip's group offers); mi2v_prob / mm2v_prob: share of samples given their
        first frame (MI2V) or first 5 frames (MM2V); the rest are plain M2V.
    rope_shift / fix_mem: as in rendering (they must match the render that uses the LoRA).
    boundary_ratio: the expert split (high noise: t >= boundary x 1000); timestep_shift:
        the flow-matching shift of the training timestep distribution.
    seed: LoRA initialisation, data order, every sample's draws.
    checkpoint_every / keep_checkpoints / checkpoints: Ray Train checkpoints (default
        `{out}/checkpoints`); max_failures: automatic restarts after a failed worker.
    parallel: fsdp (FSDP2 `fully_shard` of each block and the model) or ddp.
    gradient_checkpointing: recompute block activations in the backward pass.
    validate_every / validation: render `validation.script` every K steps.
    """

    data: str
    out: str
    model: ModelSpec
    steps: int
    expert: str = "both"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    max_memory: int = 10
    mi2v_prob: float = 0.5
    mm2v_prob: float = 0.0
    rope_shift: int | None = 5
    fix_mem: int | None = None
    boundary_ratio: float = 0.9
    timestep_shift: float = 4.0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    checkpoints: str | None = None
    max_failures: int = 3
    parallel: str = "fsdp"
    gradient_checkpointing: bool = True
    validate_every: int | None = None
    validation: ValidationSpec | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.rope_shift == 0:
            object.__setattr__(self, "rope_shift", None)  # 0 and None: contiguous positions
        super().__post_init__()

    def problems(self) -> list[str]:
        out: list[str] = []
        _check_uri(out, "data", self.data)
        _check_uri(out, "out", self.out)
        if self.checkpoints is not None:
            _check_uri(out, "checkpoints", self.checkpoints)
        if self.model.lora_dir or self.model.distill_lora_dir:
            out.append("fit trains a LoRA on the base experts: leave lora_dir and "
                       "distill_lora_dir unset")
        if self.model.device is not None:
            out.append("fit places the expert on each Ray Train worker's device (a GPU with "
                       "gpus_per_worker > 0, else the CPU): leave model.device unset")
        if self.model.offload or self.model.storage_dtype or self.model.compile:
            out.append("offload, storage_dtype and compile are render options; fit shards "
                       "the expert with FSDP instead")
        check_number(out, "steps", self.steps, minimum=1, integer=True)
        check_choice(out, "expert", self.expert, EXPERTS)
        _check_workers(out, self.workers, self.cpus_per_worker, self.gpus_per_worker)
        check_number(out, "lora_rank", self.lora_rank, minimum=1, integer=True, optional=True)
        check_number(out, "lora_alpha", self.lora_alpha, above=0, optional=True)
        check_number(out, "lr", self.lr, above=0)
        check_number(out, "warmup_steps", self.warmup_steps, minimum=0, integer=True)
        check_number(out, "weight_decay", self.weight_decay, minimum=0)
        check_number(out, "max_grad_norm", self.max_grad_norm, above=0)
        check_number(out, "grad_accum", self.grad_accum, minimum=1, integer=True)
        check_number(out, "max_memory", self.max_memory, minimum=0, integer=True)
        for name in ("mi2v_prob", "mm2v_prob"):
            check_number(out, name, getattr(self, name), minimum=0, maximum=1)
        if all(isinstance(getattr(self, n), (int, float)) for n in ("mi2v_prob", "mm2v_prob")) \
                and self.mi2v_prob + self.mm2v_prob > 1:
            out.append(f"mi2v_prob + mm2v_prob must be <= 1, got {self.mi2v_prob + self.mm2v_prob:g}")
        check_number(out, "rope_shift", self.rope_shift, minimum=0, integer=True, optional=True)
        check_number(out, "fix_mem", self.fix_mem, minimum=0, integer=True, optional=True)
        check_number(out, "boundary_ratio", self.boundary_ratio, above=0, maximum=1)
        if isinstance(self.boundary_ratio, (int, float)) and self.boundary_ratio >= 1:
            out.append("boundary_ratio 1 leaves the high-noise expert no timesteps")
        check_number(out, "timestep_shift", self.timestep_shift, above=0)
        check_number(out, "seed", self.seed, minimum=0, integer=True)
        check_number(out, "checkpoint_every", self.checkpoint_every, minimum=1, integer=True)
        check_number(out, "keep_checkpoints", self.keep_checkpoints, minimum=1, integer=True)
        check_number(out, "max_failures", self.max_failures, minimum=0, integer=True)
        check_choice(out, "parallel", self.parallel, PARALLEL_MODES)
        if not isinstance(self.gradient_checkpointing, bool):
            out.append(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        check_number(out, "validate_every", self.validate_every, minimum=1, integer=True, optional=True)
        if self.validate_every is not None and self.validation is None:
            out.append("validate_every needs a validation spec (the script to render)")
        return out

    @property
    def experts(self) -> tuple[str, ...]:
        """The experts this fit trains, in order."""
        return ("high", "low") if self.expert == "both" else (self.expert,)

    @property
    def rank(self) -> int:
        """The LoRA rank: `lora_rank`, else the rank the loader expects for this model (the
        released 128; the tiny preset's own)."""
        from storymem_model.presets import REAL_LORA_RANK, TINY

        if self.lora_rank is not None:
            return self.lora_rank
        return TINY.lora_rank if self.model.preset == "tiny" else REAL_LORA_RANK

    @property
    def alpha(self) -> float:
        """lora_alpha (rank by default: the released files' r = alpha)."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def checkpoint_uri(self) -> str:
        from storymem_model.storage import join

        return self.checkpoints or join(self.out, "checkpoints")

    @property
    def samples_per_step(self) -> int:
        return self.workers * self.grad_accum
