"""Every size and default of the model core, in one place.

Two sets of numbers live here:

* the real Wan2.2 A14B shot defaults (81 frames, 832x480, 16 fps, 40 steps), which are the
  pipeline defaults whenever real weights are loaded, and
* `TINY`: the same architectures at tiny sizes, built with seeded random weights so the
  whole system runs and is tested on a CPU. Tiny videos are noise.

This module must stay import-light (no torch, no diffusers): the HPS worker environment
imports `storymem_model.*` with other library versions.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShotDefaults:
    """Default shot geometry and step count of a loaded model."""

    height: int
    width: int
    num_frames: int
    fps: int
    num_inference_steps: int


# Wan2.2 A14B as used by StoryMem: 81 frames at 16 fps, 832x480, 40 steps.
REAL_SHOT = ShotDefaults(height=480, width=832, num_frames=81, fps=16, num_inference_steps=40)

# LoRA format of the released StoryMem weights (docs/method.md#lora-format-and-scale): rank 128, alpha 128, rsLoRA.
REAL_LORA_RANK = 128
REAL_TEXT_LENGTH = 512  # UMT5 sequence length used by Wan


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of the `tiny` preset: the real classes, tiny, with seeded random weights."""

    shot: ShotDefaults = ShotDefaults(height=64, width=64, num_frames=17, fps=16, num_inference_steps=4)
    weights_seed: int = 0
    # WanTransformer3DModel (both experts; I2V experts take 36 channels, T2V experts 16).
    num_attention_heads: int = 2
    attention_head_dim: int = 16  # rope split t/h/w = 8/4/4
    ffn_dim: int = 64
    num_layers: int = 2
    freq_dim: int = 32
    # AutoencoderKLWan (z_dim 16 and strides (4, 8, 8) as the real VAE).
    vae_base_dim: int = 4
    vae_decoder_base_dim: int = 2  # decoding is most of a tiny shot's time
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_num_res_blocks: int = 1
    # UMT5 encoder and its tokenizer (byte-level BPE trained in code on a fixed corpus).
    text_dim: int = 32
    text_num_layers: int = 2
    text_num_heads: int = 4
    text_d_kv: int = 8
    text_d_ff: int = 64
    text_relative_buckets: int = 32
    text_relative_max_distance: int = 128
    tokenizer_vocab_size: int = 512
    text_length: int = 128
    # LoRA rank the tiny model expects for StoryMem-format LoRA files (real: 128).
    lora_rank: int = 8
    # Which experts are built: the I2V pair always, the T2V pair for `use_t2v` shots.
    with_t2v: bool = True


TINY = TinyPreset()
