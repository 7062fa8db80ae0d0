"""HPSv3 loaded through the real `hpsv3` package; runs INSIDE the HPS environment.

The `hpsv3` package pins transformers 4.45.2, so this module is only imported by
`.hps-venv/bin/python` (see `infra/hps-env.mk` and docs/hps.md), normally by the worker
process `storymem_model.scorers.hps_worker`. It imports numpy, PIL, yaml, torch and hpsv3
only: nothing torch-heavy from storymem_model (no open_clip, no diffusers).

`HPSv3Model(checkpoint_path, base_model_path)` builds hpsv3's `HPSv3RewardInferencer` from
the package's own YAML config with the Qwen2-VL base pointed at a local folder (nothing is
downloaded), loads the HPSv3 checkpoint, and `score(images, prompts)` scores a whole batch
of uint8 images in one forward pass. Scores are the "mu" output of HPSv3 (its first logit),
as the package documents; prompts default to the empty string (docs/method.md#keyframes).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from storymem_model.scorers.base import ScorerError, check_image_batch, check_prompts

# The dtype names HPSv3's YAML understands, and how they map onto its training flags.
_DTYPES = {"bfloat16": {"bf16": True, "fp16": False},
           "float16": {"bf16": False, "fp16": True},
           "float32": {"bf16": False, "fp16": False}}


def check_model_paths(checkpoint_path: str | os.PathLike,
                      base_model_path: str | os.PathLike) -> tuple[Path, Path]:
    """Both paths must exist: a checkpoint file and a Qwen2-VL folder with a config.json."""
    checkpoint = Path(checkpoint_path)
    base = Path(base_model_path)
    if not checkpoint.is_file():
        raise ScorerError(f"HPSv3 checkpoint not found: {checkpoint} (expected a .safetensors "
                          "or .pth file, e.g. HPSv3.safetensors)")
    if checkpoint.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ScorerError(f"HPSv3 checkpoint {checkpoint}: expected .safetensors or .pth")
    if not (base / "config.json").is_file():
        raise ScorerError(f"Qwen2-VL base model folder not found or has no config.json: {base} "
                          "(expected a local copy of Qwen2-VL-7B-Instruct, or a tiny one "
                          "from storymem_model.scorers.hps_tiny)")
    return checkpoint, base


def default_dtype(device: str) -> str:
    """bfloat16 on GPUs (as HPSv3 ships), float32 on CPU."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def write_hps_config(base_model_path: str | os.PathLike, folder: str | os.PathLike,
                     dtype: str = "bfloat16") -> Path:
    """HPSv3's own YAML with the base model path and dtype replaced; returns the file path.

    Everything else (reward head type, special reward token, output dim, pixel budget) stays
    as the package ships it, so the real checkpoint's state dict matches exactly.
    """
    import yaml
    import hpsv3

    if dtype not in _DTYPES:
        raise ScorerError(f"HPSv3 dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    shipped = Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml"
    config = yaml.safe_load(shipped.read_text())
    config["model_name_or_path"] = str(Path(base_model_path).resolve())
    config["torch_dtype"] = dtype
    config.update(_DTYPES[dtype])
    config["output_dir"] = str(Path(folder) / "unused_output_dir")
    config["report_to"] = "none"
    config["gradient_checkpointing"] = False
    config["dataloader_num_workers"] = 0
    path = Path(folder) / "hpsv3_inference.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class HPSv3Model:
    """HPSv3 reward model: uint8 images in, one float score ("mu") per image out."""

    def __init__(self, checkpoint_path: str | os.PathLike, base_model_path: str | os.PathLike,
                 device: str = "cpu", dtype: str | None = None):
        import torch
        from hpsv3 import HPSv3RewardInferencer

        checkpoint, base = check_model_paths(checkpoint_path, base_model_path)
        self.device = str(device)
        self.dtype = dtype or default_dtype(self.device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ScorerError(f"HPSv3 device {self.device!r}: CUDA is not available here")
        with tempfile.TemporaryDirectory(prefix="hpsv3-config-") as folder:
            config_path = write_hps_config(base, folder, self.dtype)
            self.inferencer = HPSv3RewardInferencer(
                config_path=str(config_path), checkpoint_path=str(checkpoint), device=self.device)
        self.checkpoint_path = str(checkpoint)
        self.base_model_path = str(base)

    def score(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N,) float32, all N in one forward pass."""
        import torch
        from PIL import Image

        batch = check_image_batch(images)
        texts = check_prompts(prompts, len(batch))
        pil_images = [Image.fromarray(image) for image in batch]
        with torch.inference_mode():
            rewards = self.inferencer.reward(pil_images, texts)
        return rewards[:, 0].float().cpu().numpy().astype(np.float32)
