"""`load_pipeline`: the tiny preset, diffusers-format Wan2.2 folders, original Wan2.2 checkpoints.

Accepted layouts:

* `"tiny"`: the real classes at tiny sizes with seeded random weights (`tiny_models.py`).
* diffusers layout, as in the `Wan-AI/Wan2.2-I2V-A14B-Diffusers` and `-T2V-A14B-Diffusers`
  repositories: `model_index.json`, `transformer/` (high-noise expert), `transformer_2/`
  (low-noise expert), `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
* original layout, as in `Wan-AI/Wan2.2-I2V-A14B`: `high_noise_model/` and `low_noise_model/`,
  each a `config.json` plus safetensors shards. Only the experts are read from it; the VAE,
  text encoder and tokenizer come from a diffusers-layout folder given as `components=`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .presets import REAL_SHOT, REAL_TEXT_LENGTH, TINY

logger = logging.getLogger(__name__)

DIFFUSERS_EXPERTS = ("transformer", "transformer_2")
ORIGINAL_EXPERTS = ("high_noise_model", "low_noise_model")


class ModelLoadError(ValueError):
    """A model folder or file that cannot be loaded; the message names the path and the problem."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def cast_keeping_fp32_modules(model: torch.nn.Module | None, dtype: torch.dtype) -> None:
    """Cast floating weights to `dtype`, except the submodules the model keeps in fp32."""
    if model is None:
        return
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if keep.intersection(name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)


def detect_layout(folder: Path) -> str:
    """'diffusers' or 'original'; ModelLoadError naming what is missing otherwise."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (expected a Wan2.2 model folder or 'tiny')")
    if all((folder / name).is_dir() for name in DIFFUSERS_EXPERTS):
        return "diffusers"
    if all((folder / name).is_dir() for name in ORIGINAL_EXPERTS):
        return "original"
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise ModelLoadError(
        f"{folder}: not a Wan2.2 A14B layout: expected {'/ and '.join(DIFFUSERS_EXPERTS)}/ (diffusers) or "
        f"{'/ and '.join(ORIGINAL_EXPERTS)}/ (original checkpoints); found {present}")


def load_pipeline(preset_or_path: str | os.PathLike, lora=None, device=None, dtype=None, *, t2v=None,
                  components=None, lora_strength: float = 1.0, fuse_lora: bool = False,
                  lora_rank: int | None = None, lora_alpha: float | None = None, offload: str | None = None,
                  vae_dtype=torch.float32):
    """Build a `StoryMemPipeline`.

    preset_or_path: "tiny" or a Wan2.2 I2V-A14B folder (diffusers or original layout).
    lora: a folder with backbone_high_noise.{pth,safetensors} and backbone_low_noise.*, or a
        (high, low) tuple of files; loaded with rsLoRA scale alpha/sqrt(r) times `lora_strength`.
    device / dtype: default cuda + bf16 when a GPU is visible, else cpu + fp32.
    t2v: a Wan2.2 T2V-A14B folder for text-only first shots (tiny builds its own T2V experts).
    components: for an original-layout folder, the diffusers-layout folder that supplies the
        VAE, text encoder and tokenizer.
    offload: None, "model" (whole components move to the GPU when used) or "sequential"
        (layer by layer, slowest, least memory); needs an accelerator.
    """
    from .lora_loading import load_storymem_lora
    from .shot_pipeline import StoryMemPipeline

    device = torch.device(device) if device is not None else default_device()
    dtype = _resolve_dtype(dtype) or default_dtype(device)
    vae_dtype = _resolve_dtype(vae_dtype) or torch.float32
    if offload not in (None, "model", "sequential"):
        raise ValueError(f"offload must be None, 'model' or 'sequential', got {offload!r}")
    if offload is not None and device.type == "cpu":
        raise ValueError("offload moves weights between CPU and an accelerator; it needs device='cuda'")

    if str(preset_or_path) == "tiny":
        from .tiny_models import build_tiny_components

        if t2v not in (None, "tiny"):
            raise ValueError("the tiny preset builds its own T2V experts; t2v must be None")
        parts = build_tiny_components(TINY)
        shot, text_length, model_id, scheduler_config = TINY.shot, TINY.text_length, "tiny", None
        expected_rank = lora_rank or TINY.lora_rank
    else:
        parts, scheduler_config = _load_folder_components(Path(preset_or_path), components, t2v, dtype)
        shot, text_length = REAL_SHOT, REAL_TEXT_LENGTH
        model_id = str(Path(preset_or_path).resolve())
        expected_rank = lora_rank

    pipeline = StoryMemPipeline(**parts)
    lora_id = None
    if lora is not None:
        lora_id = load_storymem_lora(pipeline, lora, strength=lora_strength, fuse=fuse_lora,
                                     rank=expected_rank, alpha=lora_alpha)
    for name in ("text_encoder", "transformer", "transformer_2", "t2v_transformer", "t2v_transformer_2"):
        cast_keeping_fp32_modules(getattr(pipeline, name), dtype)
    cast_keeping_fp32_modules(pipeline.vae, vae_dtype)
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)
    pipeline.configure(shot=shot, text_length=text_length, model_id=model_id, lora_id=lora_id,
                       scheduler_config=scheduler_config, offload_device=device if offload else None)
    return pipeline


def _load_folder_components(folder: Path, components, t2v, dtype) -> tuple[dict, dict | None]:
    raise NotImplementedError("loading real Wan2.2 folders is not implemented yet (only 'tiny')")
