"""StoryMem model core: Memory-to-Video shots on Wan2.2 (diffusers), memory, scripts, runner.

Kept import-light on purpose: the public names below load torch/diffusers only when first
used, because some workers import `storymem_model.scorers.*` in an environment with other
diffusers/transformers versions.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "load_pipeline": "storymem_model.model_loading",
    "ModelLoadError": "storymem_model.model_loading",
    "StoryMemPipeline": "storymem_model.shot_pipeline",
    "memory_rope_positions": "storymem_model.rope",
    "shot_seed": "storymem_model.seeds",
    "LoraLoadError": "storymem_model.lora_loading",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'storymem_model' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
