"""How keyframe selection sees a shot's frames (docs/method.md#keyframe-preprocessing).

Two modes, a `ScorerSpec` / `RenderConfig` setting (`keyframe_preprocess`):

* "reference" (default), what the authors' reference release does: every frame is first
  resized (bilinear, antialias) to the Qwen2-VL "smart resize" size - both sides multiples
  of 28, at most 256 x 28 x 28 pixels (480x832 -> 336x588) - and the quality gate scores
  those frames (HPSv3 with the empty prompt); CLIP gets each of them squashed to its input
  size (bilinear, no antialias, no crop) with CLIP's mean/std. The duplicate check against
  stored keyframes uses the embeddings made the same way.
* "direct": each scorer resizes the full-size frames itself (CLIP: bicubic, antialias,
  squash; the aesthetic predictor's CLIP: its own centre crop).

The resize runs on uint8 frames with torchvision (its rounding to uint8 included), as a
video decoder's frames would be. Importing this module loads no numpy or torch: the specs
and the config take their list of modes (`MODES`) from here.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PATCH_FACTOR = 28  # Qwen2-VL: 14-pixel patches merged 2 x 2
MIN_PIXELS = 56 * 56
MAX_PIXELS = 256 * 28 * 28
MODES = ("reference", "direct")


def smart_resize_size(height: int, width: int, factor: int = PATCH_FACTOR,
                      min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
                      ) -> tuple[int, int]:
    """Qwen2-VL's smart resize: the nearest multiples of `factor`, scaled down (or up) so
    the area stays within [min_pixels, max_pixels], aspect ratio kept as far as it goes."""
    if height < 1 or width < 1:
        raise ValueError(f"smart resize needs a positive size, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} is over 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_frames(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 frames resized to the smart-resize size, bilinear with
    antialias, still uint8."""
    import numpy as np
    import torch
    from torchvision.transforms import functional as TF

    frames = np.require(frames, requirements=["C", "W"])  # torch needs writable memory
    height, width = smart_resize_size(frames.shape[1], frames.shape[2])
    if (height, width) == frames.shape[1:3]:
        return frames
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2)
    resized = TF.resize(pixels, [height, width], interpolation=TF.InterpolationMode.BILINEAR,
                        antialias=True)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def frames_for_scoring(frames: np.ndarray, mode: str) -> np.ndarray:
    """The frames the gate and CLIP see in `mode`."""
    if mode not in MODES:
        raise ValueError(f"keyframe preprocessing must be one of {', '.join(MODES)}, got {mode!r}")
    return reference_frames(frames) if mode == "reference" else frames
