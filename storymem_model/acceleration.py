"""Lighter weights and faster kernels for the transformer experts, as model-spec options.

* `storage_dtype` ("float8_e4m3fn" / "float8_e5m2"): weights stay in fp8 between forwards
  and each layer is cast to the compute dtype just before it runs (diffusers' layerwise
  casting). Halves an expert's weight memory against bf16 (one A14B expert: ~14 GB instead
  of ~28 GB); norms, embeddings and LoRA matrices stay in the compute dtype. Runs on a CPU
  too (slowly: the casts are not fused).
* `offload="group"`: diffusers' group offloading, block by block with CUDA streams, for
  24-48 GB GPUs (needs an accelerator).
* `attention_backend`: diffusers' attention dispatcher ("native" = PyTorch SDPA, "flash" =
  flash-attn, "sage" = SageAttention); a backend whose package or device is missing is
  refused with an error naming what to install.
* `compile`: regional `torch.compile` of the repeated transformer blocks (the blocks are
  compiled once and reused; the first shot pays the compile time).

`apply_acceleration(pipeline, spec-like values)` applies them in the right order after the
weights and LoRAs are loaded.
"""
from __future__ import annotations

import importlib.util

import torch

ATTENTION_PACKAGES = {"flash": "flash_attn", "sage": "sageattention"}
STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# Modules whose weights stay in the compute dtype under layerwise casting: diffusers' own
# defaults (norms, embeddings, ...) plus the LoRA matrices.
LORA_PATTERNS = ("lora_A", "lora_B")


class AccelerationError(ValueError):
    """An acceleration option this machine or model cannot use; names what is missing."""


def experts(pipeline) -> list:
    return [e for e in (pipeline.transformer, pipeline.transformer_2,
                        getattr(pipeline, "t2v_transformer", None),
                        getattr(pipeline, "t2v_transformer_2", None)) if e is not None]


def check_attention_backend(backend: str, device: torch.device) -> None:
    if backend == "native":
        return
    if backend not in ATTENTION_PACKAGES:
        raise AccelerationError(f"attention backend must be one of native, "
                                f"{', '.join(ATTENTION_PACKAGES)}, got {backend!r}")
    package = ATTENTION_PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise AccelerationError(f"attention backend {backend!r} needs the {package} package, "
                                f"which is not installed (pip install {package.replace('_', '-')}"
                                f" on a CUDA machine), or use --attention-backend native")
    if torch.device(device).type != "cuda":
        raise AccelerationError(f"attention backend {backend!r} runs on CUDA GPUs only; the "
                                f"model is on {device}")


def store_weights_in(pipeline, storage_dtype: str, compute_dtype: torch.dtype) -> None:
    """Keep every expert's weights in `storage_dtype`, computing in `compute_dtype`."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    if storage_dtype not in STORAGE_DTYPES:
        raise AccelerationError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                                f"got {storage_dtype!r}")
    for expert in experts(pipeline):
        skip = tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(
            getattr(expert, "_skip_layerwise_casting_patterns", None) or ()) + LORA_PATTERNS
        expert.enable_layerwise_casting(storage_dtype=STORAGE_DTYPES[storage_dtype],
                                        compute_dtype=compute_dtype,
                                        skip_modules_pattern=skip)


def group_offload(pipeline, device: torch.device) -> None:
    """Block-level group offloading of the experts (the largest parts) onto `device`;
    the VAE and text encoder move whole."""
    if torch.device(device).type == "cpu":
        raise AccelerationError("offload='group' moves blocks between CPU and an "
                                "accelerator; it needs device cuda")
    for expert in experts(pipeline):
        expert.enable_group_offload(onload_device=torch.device(device), offload_type="block_level",
                                    num_blocks_per_group=1, use_stream=True)
    for name in ("text_encoder", "vae"):
        getattr(pipeline, name).to(device)


def compile_blocks(pipeline) -> None:
    """Regional compilation: each expert's repeated transformer blocks through torch.compile."""
    for expert in experts(pipeline):
        expert.compile_repeated_blocks(fullgraph=True)


def apply_acceleration(pipeline, *, device: torch.device, compute_dtype: torch.dtype,
                       storage_dtype: str | None = None, attention_backend: str = "native",
                       compile: bool = False) -> None:
    """Apply the options after loading (and after LoRAs, which stay in the compute dtype)."""
    check_attention_backend(attention_backend, device)
    if storage_dtype is not None:
        store_weights_in(pipeline, storage_dtype, compute_dtype)
    if attention_backend != "native":
        for expert in experts(pipeline):
            expert.set_attention_backend(attention_backend)
    if compile:
        compile_blocks(pipeline)
