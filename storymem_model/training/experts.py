"""One frozen Wan2.2 I2V-A14B expert to train: the tiny preset's, or one from a model folder.

Only the expert being trained is read (a fit of the high-noise expert never loads the
low-noise one; `model_loading.load_expert`): `transformer/` (high) or `transformer_2/` (low)
of a diffusers-layout folder, `high_noise_model/` or `low_noise_model/` of the original
layout. Its rope module is replaced by the one that takes explicit temporal positions
(`rope.install_frame_position_rope`), as in the inference pipeline.
"""
from __future__ import annotations

import torch

from storymem_model.specs import ModelSpec


def load_expert(model: ModelSpec, expert: str, dtype: torch.dtype):
    """The `expert` ("high" or "low") of `model`, in `dtype`, eval mode, on the CPU."""
    from storymem_model import model_loading as ml
    from storymem_model.rope import install_frame_position_rope

    if expert not in ml.EXPERTS:
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    if model.preset == "tiny":
        from storymem_model.presets import TINY
        from storymem_model.tiny_models import build_tiny_components

        parts = build_tiny_components(TINY)  # named as the experts' diffusers-layout folders
        module = parts[ml.DIFFUSERS_EXPERTS[ml.EXPERTS.index(expert)]]
        ml.cast_keeping_fp32_modules(module, dtype)
    else:
        module = ml.load_expert(model.model_dir, expert, dtype, in_channels=36, role=ml.M2V_ROLE)
    install_frame_position_rope(module)
    return module.eval()
