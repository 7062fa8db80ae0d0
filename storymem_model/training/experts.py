"""One frozen Wan2.2 I2V-A14B expert to train: the tiny preset's, or one from a model folder.

Only the expert being trained is read (a fit of the high-noise expert never loads the
low-noise one): `transformer/` (high) or `transformer_2/` (low) of a diffusers-layout
folder, `high_noise_model/` or `low_noise_model/` of the original layout. Its rope module is
replaced by the one that takes explicit temporal positions (`rope.install_frame_position_rope`),
as in the inference pipeline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from storymem_model.specs import ModelSpec

DIFFUSERS_NAMES = {"high": "transformer", "low": "transformer_2"}
ORIGINAL_NAMES = {"high": "high_noise_model", "low": "low_noise_model"}
TINY_NAMES = {"high": "transformer", "low": "transformer_2"}


def load_expert(model: ModelSpec, expert: str, dtype: torch.dtype):
    """The `expert` ("high" or "low") of `model`, in `dtype`, eval mode, on the CPU."""
    from storymem_model import model_loading as ml
    from storymem_model.rope import install_frame_position_rope

    if expert not in DIFFUSERS_NAMES:
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    if model.preset == "tiny":
        from storymem_model.presets import TINY
        from storymem_model.tiny_models import build_tiny_components

        module = build_tiny_components(TINY)[TINY_NAMES[expert]]
        ml.cast_keeping_fp32_modules(module, dtype)
    else:
        folder = Path(model.model_dir)
        if ml.detect_layout(folder) == "diffusers":
            path = folder / DIFFUSERS_NAMES[expert]
            module = ml._load(path, f"{expert}-noise expert", lambda p: ml._diffusers().WanTransformer3DModel
                              .from_pretrained(p, torch_dtype=dtype))
        else:
            path = folder / ORIGINAL_NAMES[expert]
            module = ml.load_original_expert(path, dtype)
        if module.config.in_channels != 36:
            raise ml.ModelLoadError(f"{path}: an M2V (I2V-A14B) expert takes 36 input channels, this one "
                                    f"takes {module.config.in_channels}")
    install_frame_position_rope(module)
    return module.eval()
