"""`StoryMemPipeline`: one StoryMem shot on diffusers' Wan2.2 classes.

Steps of `generate_shot`: check inputs, encode the prompt (and the negative prompt, cached),
prepare memory latents (VAE-encoded keyframes, or precomputed ones), the shot's
conditioning video and mask (`conditioning.py`), the noise, then two-expert flow-matching
UniPC denoising with classifier-free guidance, memory frames dropped, decode.

Modes (docs/method.md#the-method-in-brief): M2V (0..N memory images), MI2V (`first_frame`), MM2V (`motion_frames`,
5 frames), MR2V (reference images as `memory` for a story's first shot: the same path as
M2V), and T2V (`use_t2v=True`, the Wan2.2 T2V-A14B experts, no conditioning).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel

from . import conditioning as cond
from .presets import REAL_SHOT, ShotDefaults
from .rope import DEFAULT_ROPE_SHIFT, frame_positions, install_frame_position_rope
from .records import ShotStats
from .sampling import (M2V_SAMPLING, T2V_SAMPLING, SamplingConfig, evaluations_per_step,
                       expert_for_timestep, make_scheduler, uses_cfg)
from .shot_modes import ShotMode
from .text_encoding import WAN_NEGATIVE_PROMPT, PromptEncoder

logger = logging.getLogger(__name__)

KEYFRAME_ENCODE_BATCH = 8


@dataclass
class ShotLatents:
    """Denoised shot latents (1, 16, f, h, w), before decoding, and what produced them."""

    latents: torch.Tensor
    num_given_frames: int
    mode: str  # the ShotMode name: T2V, M2V, MI2V or MM2V
    model_evaluations: int = 0  # transformer evaluations x batch (40-step CFG: 80)
    denoise_seconds: float = 0.0


class StoryMemPipeline(DiffusionPipeline):
    """Memory-to-Video shot generation on Wan2.2 A14B (two experts), built from components."""

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->t2v_transformer->t2v_transformer_2->vae"
    _optional_components = ["t2v_transformer", "t2v_transformer_2"]

    def __init__(self, tokenizer, text_encoder, vae: AutoencoderKLWan, transformer: WanTransformer3DModel,
                 transformer_2: WanTransformer3DModel, t2v_transformer: WanTransformer3DModel | None = None,
                 t2v_transformer_2: WanTransformer3DModel | None = None):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
            transformer_2=transformer_2, t2v_transformer=t2v_transformer, t2v_transformer_2=t2v_transformer_2)
        for expert in (transformer, transformer_2, t2v_transformer, t2v_transformer_2):
            if expert is not None:
                install_frame_position_rope(expert)
        self._check_experts()
        self.lora_fused = False
        self.distill_lora_id: str | None = None
        self.storage_dtype: str | None = None  # see acceleration.py
        self.attention_backend = "native"
        self.compiled = False
        self.configure()

    def configure(self, *, shot: ShotDefaults = REAL_SHOT, text_length: int = 512, model_id: str = "custom",
                  lora_id: str | None = None, t2v_model_id: str | None = None, scheduler_config: dict | None = None,
                  offload_device: torch.device | None = None,
                  compute_dtype: torch.dtype | None = None) -> "StoryMemPipeline":
        """Set the defaults and identity of this pipeline (called by `load_pipeline`)."""
        self.default_height = shot.height
        self.default_width = shot.width
        self.default_num_frames = shot.num_frames
        self.fps = shot.fps
        self.default_sampling = M2V_SAMPLING.updated(num_inference_steps=shot.num_inference_steps).as_dict()
        self.default_t2v_sampling = T2V_SAMPLING.updated(num_inference_steps=shot.num_inference_steps).as_dict()
        self.model_id = model_id
        self.lora_id = lora_id
        self.t2v_model_id = t2v_model_id if self.has_t2v else None
        self.scheduler_config = scheduler_config
        self._compute_device = offload_device
        self._compute_dtype = compute_dtype
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.text_encoder, text_length)
        self._zero_condition_cache: dict[tuple, torch.Tensor] = {}
        return self

    def _check_experts(self) -> None:
        for name in ("transformer", "transformer_2"):
            channels = getattr(self, name).config.in_channels
            if channels != 36:
                raise ValueError(f"{name}: an M2V (I2V-A14B) expert takes 36 input channels, this one takes {channels}")
        for name in ("t2v_transformer", "t2v_transformer_2"):
            expert = getattr(self, name)
            if expert is not None and expert.config.in_channels != 16:
                raise ValueError(f"{name}: a T2V expert takes 16 input channels, this one takes "
                                 f"{expert.config.in_channels}")

    # ------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        """Where the computation runs (the accelerator when components are offloaded to the CPU)."""
        if getattr(self, "_compute_device", None) is not None:
            return self._compute_device
        return next(self.transformer.parameters()).device

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (weights may be stored in fp8, see acceleration.py)."""
        return getattr(self, "_compute_dtype", None) or self.transformer.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype

    def load_lora(self, lora, strength: float = 1.0, fuse: bool = False, rank: int | None = None,
                  alpha: float | None = None) -> str:
        """Load a StoryMem LoRA pair (see `lora_loading.load_storymem_lora`); returns the lora_id."""
        from .lora_loading import load_storymem_lora

        return load_storymem_lora(self, lora, strength=strength, fuse=fuse, rank=rank, alpha=alpha)

    def unload_lora(self) -> None:
        from .lora_loading import unload_storymem_lora

        unload_storymem_lora(self)

    @property
    def has_t2v(self) -> bool:
        return self.t2v_transformer is not None and self.t2v_transformer_2 is not None

    # ------------------------------------------------------------------ VAE
    def _latent_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1)
        return mean.to(device, dtype), std.to(device, dtype)

    @torch.no_grad()
    def _vae_encode(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalized latents (B, 16, f, h, w) float32 on self.device."""
        latents = self.vae.encode(videos.to(self.device, self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(latents.device, latents.dtype)
        return ((latents - mean) / std).to(self.device)

    @torch.no_grad()
    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (1, 16, f, h, w) -> video (3, F, H, W) in [-1, 1]."""
        mean, std = self._latent_stats(latents.device, torch.float32)
        raw = latents.float() * std + mean
        return self.vae.decode(raw.to(self.device, self.vae.dtype)).sample[0]

    @torch.no_grad()
    def encode_keyframes(self, images, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Each keyframe (M, H, W, 3) uint8 VAE-encoded as a 1-frame video -> (M, 16, 1, h, w) float32 CPU."""
        height, width = self._check_size(height, width)
        pixels = cond.images_to_tensor(images, height, width, name="keyframes")
        h, w = cond.latent_size(height, width)
        if len(pixels) == 0:
            return torch.zeros(0, cond.LATENT_CHANNELS, 1, h, w)
        chunks = [self._vae_encode(chunk[:, :, None]).cpu()
                  for chunk in pixels.split(KEYFRAME_ENCODE_BATCH)]
        return torch.cat(chunks)

    def _shot_condition_latents(self, given: torch.Tensor | None, num_frames: int, height: int,
                                width: int) -> torch.Tensor:
        """VAE latents (16, f, h, w) of the conditioning video; the all-zero one is cached."""
        if given is None:
            key = (num_frames, height, width, str(self.device), self.vae.dtype)
            if key not in self._zero_condition_cache:
                video = cond.conditioning_video(None, num_frames, height, width)
                self._zero_condition_cache[key] = self._vae_encode(video[None])[0]
            return self._zero_condition_cache[key]
        video = cond.conditioning_video(given, num_frames, height, width)
        return self._vae_encode(video[None])[0]

    # ------------------------------------------------------------------ checks
    def _check_size(self, height, width) -> tuple[int, int]:
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
        return height, width

    def _check_num_frames(self, num_frames, num_given: int) -> int:
        num_frames = self.default_num_frames if num_frames is None else num_frames
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
                or (num_frames - 1) % cond.VAE_TEMPORAL_STRIDE:
            raise ValueError(f"num_frames must be 4k+1 (e.g. 17, 81), got {num_frames!r}")
        if num_frames <= num_given:
            raise ValueError(f"num_frames={num_frames} leaves no new frame after {num_given} conditioned frames")
        return num_frames

    def _memory_latents(self, memory, memory_latents, height: int, width: int) -> torch.Tensor:
        h, w = cond.latent_size(height, width)
        if memory_latents is not None:
            if not isinstance(memory_latents, torch.Tensor):
                raise TypeError(f"memory_latents must be a torch.Tensor, got {type(memory_latents).__name__}")
            expected = (cond.LATENT_CHANNELS, 1, h, w)
            if memory_latents.ndim != 5 or tuple(memory_latents.shape[1:]) != expected:
                raise ValueError(f"memory_latents has shape {tuple(memory_latents.shape)}, but a {height}x{width} "
                                 f"shot needs (M, {', '.join(map(str, expected))}) from encode_keyframes")
            if not torch.isfinite(memory_latents).all():
                raise ValueError("memory_latents contains NaN or inf")
            return memory_latents.to(self.device, torch.float32)
        if memory is None:
            return torch.zeros(0, cond.LATENT_CHANNELS, 1, h, w, device=self.device)
        return self.encode_keyframes(memory, height, width).to(self.device)

    # ------------------------------------------------------------------ generation
    def generate_shot(self, prompt: str, memory=None, memory_latents: torch.Tensor | None = None,
                      first_frame: np.ndarray | None = None, motion_frames: np.ndarray | None = None,
                      seed: int = 0, rope_shift: int | None = DEFAULT_ROPE_SHIFT,
                      negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                      num_frames: int | None = None, use_t2v: bool = False,
                      progress: Callable[[int, int], None] | None = None, fix_mem: int | None = None,
                      stats: ShotStats | None = None, **sampling) -> np.ndarray:
        """One shot as (F_out, H, W, 3) uint8; F_out = num_frames minus the 1 or 5 conditioned frames.
        `stats` (a ShotStats) receives the shot's model evaluations and denoising seconds."""
        result = self.generate_shot_latents(
            prompt, memory=memory, memory_latents=memory_latents, first_frame=first_frame,
            motion_frames=motion_frames, seed=seed, rope_shift=rope_shift, negative_prompt=negative_prompt,
            height=height, width=width, num_frames=num_frames, use_t2v=use_t2v, progress=progress,
            fix_mem=fix_mem, **sampling)
        video = cond.frames_to_uint8(self._vae_decode(result.latents))
        self.maybe_free_model_hooks()
        if stats is not None:
            stats.model_evaluations = result.model_evaluations
            stats.denoise_seconds = result.denoise_seconds
        return video[result.num_given_frames:]

    @torch.no_grad()
    def generate_shot_latents(self, prompt: str, memory=None, memory_latents=None, first_frame=None,
                              motion_frames=None, seed: int = 0, rope_shift: int | None = DEFAULT_ROPE_SHIFT,
                              negative_prompt: str | None = None, height=None, width=None, num_frames=None,
                              use_t2v: bool = False, progress=None, fix_mem: int | None = None,
                              **sampling) -> ShotLatents:
        """Everything of `generate_shot` except decoding: the denoised shot latents.
        `fix_mem`: memory frames after the first `fix_mem` get mask value 2 (the reference's
        optional `fix_mem`; None: every memory frame is 1)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        height, width = self._check_size(height, width)
        num_given = cond.given_frame_count(first_frame, motion_frames)
        num_frames = self._check_num_frames(num_frames, num_given)
        has_memory = memory_latents is not None or (memory is not None and len(memory) > 0)
        if use_t2v:
            if has_memory or num_given:
                raise ValueError("use_t2v=True makes a shot from text only: memory, memory_latents, first_frame "
                                 "and motion_frames must be None")
            if not self.has_t2v:
                logger.info("no T2V experts loaded: making the shot by M2V with no memory")
                use_t2v = False
        defaults = self.default_t2v_sampling if use_t2v else self.default_sampling
        config = SamplingConfig(**defaults).updated(**sampling)
        negative_prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        if not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt must be a string")

        device = self.device
        h, w = cond.latent_size(height, width)
        f = cond.num_latent_frames(num_frames)
        embeddings = self.prompt_encoder.encode([prompt, negative_prompt], device).to(self.dtype)

        if use_t2v:
            mem = torch.zeros(0, cond.LATENT_CHANNELS, 1, h, w, device=device)
            y = None
            positions = None
            mode = ShotMode.T2V.name
        else:
            mem = self._memory_latents(memory, memory_latents, height, width)
            given = None
            if first_frame is not None:
                given = cond.images_to_tensor(first_frame, height, width, name="first_frame")
            elif motion_frames is not None:
                given = cond.images_to_tensor(motion_frames, height, width, name="motion_frames")
                if len(given) != cond.MOTION_FRAMES:
                    raise ValueError(f"motion_frames must hold {cond.MOTION_FRAMES} frames, got {len(given)}")
            shot_latents = self._shot_condition_latents(given, num_frames, height, width)
            inputs = cond.m2v_inputs(mem, shot_latents, num_frames, num_given, rope_shift, fix_mem=fix_mem)
            y = inputs.y[None].to(device, self.dtype)
            positions = inputs.positions
            mode = ShotMode.given(num_given).name
        num_memory = len(mem)

        generator = torch.Generator("cpu").manual_seed(int(seed))
        shot_noise = torch.randn((1, cond.LATENT_CHANNELS, f, h, w), generator=generator)
        memory_noise = torch.randn((1, cond.LATENT_CHANNELS, num_memory, h, w), generator=generator)
        latents = torch.cat([memory_noise, shot_noise], dim=2).to(device)

        experts = {"high": self.t2v_transformer, "low": self.t2v_transformer_2} if use_t2v else \
            {"high": self.transformer, "low": self.transformer_2}
        guidance = {"high": float(config.guidance_scale), "low": float(config.guidance_scale_2)}
        scheduler = make_scheduler(config, self.scheduler_config)
        timesteps = scheduler.timesteps
        evaluations = 0
        self._synchronize(device)
        started = time.perf_counter()
        for index, t in enumerate(timesteps):
            which = expert_for_timestep(t, config.boundary_ratio)
            model = experts[which]
            model_input = latents.to(self.dtype) if y is None else torch.cat([latents.to(self.dtype), y], dim=1)
            with frame_positions(model, positions):
                noise_pred = self._guided_prediction(model, model_input, t, embeddings, guidance[which],
                                                     config.cfg_mode)
            evaluations += evaluations_per_step(guidance[which])
            latents = scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]
            if progress is not None:
                progress(index + 1, len(timesteps))
        self._synchronize(device)
        return ShotLatents(latents=latents[:, :, num_memory:], num_given_frames=num_given, mode=mode,
                           model_evaluations=evaluations, denoise_seconds=time.perf_counter() - started)

    @staticmethod
    def _synchronize(device: torch.device) -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    @staticmethod
    def _guided_prediction(model, model_input: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                           guidance_scale: float, cfg_mode: str) -> torch.Tensor:
        """Flow prediction with classifier-free guidance (embeddings: [prompt, negative])."""
        timestep = t.to(model_input.device).expand(1)
        if not uses_cfg(guidance_scale):
            return model(model_input, timestep, embeddings[:1], return_dict=False)[0]
        if cfg_mode == "batched":
            both = model(model_input.expand(2, *model_input.shape[1:]), timestep.expand(2), embeddings,
                         return_dict=False)[0]
            conditional, unconditional = both.chunk(2)
        else:
            conditional = model(model_input, timestep, embeddings[:1], return_dict=False)[0]
            unconditional = model(model_input, timestep, embeddings[1:], return_dict=False)[0]
        return unconditional + guidance_scale * (conditional - unconditional)
