"""M2V inputs: image preprocessing, the conditioning mask and the 20-channel `y` (docs/method.md#conditioning-layout-and-mask).

Layout along the latent time axis: the M memory latents first, then the shot's f latent
frames. `y` = concat(mask (4 ch), latents (16 ch)) on channels:

* latents: memory latents, then the VAE encoding of the shot's conditioning video
  (zeros for M2V, first frame + zeros for MI2V, 5 motion frames + zeros for MM2V);
* mask: 1 on every memory frame; on the shot, Wan's packing of per-pixel-frame flags, 4 per
  latent frame, with pixel frame 0 repeated 4x; a pixel frame's flag is 1 when it is given.

`m2v_inputs` is the one place the model inputs of an M2V shot are assembled - `y` and the
temporal RoPE positions (memory at negative positions, `rope.memory_rope_positions`) - from
memory latents and the shot's conditioning latents. The inference pipeline
(`StoryMemPipeline.generate_shot_latents`) and the training samples
(`storymem_model.training.samples`) both call it, so training sees exactly what inference
feeds the model.

Everything here is plain tensor code so it can be checked value by value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .rope import memory_rope_positions
from .shot_modes import MOTION_FRAMES

VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8
LATENT_CHANNELS = 16
MASK_CHANNELS = VAE_TEMPORAL_STRIDE


def num_latent_frames(num_frames: int) -> int:
    """81 pixel frames -> 21 latent frames (causal VAE: 1 + (F-1)/4)."""
    return (num_frames - 1) // VAE_TEMPORAL_STRIDE + 1


def latent_size(height: int, width: int) -> tuple[int, int]:
    return height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE


def image_list(images, name: str) -> list[np.ndarray]:
    """Images as a checked list of (H, W, 3) uint8 arrays (sizes may differ).

    Accepts one (H, W, 3) image, an (N, H, W, 3) array or a sequence of (H, W, 3) arrays.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            items = [images]
        elif images.ndim == 4:
            items = list(images)
        else:
            raise ValueError(f"{name}: expected (H, W, 3) or (N, H, W, 3) uint8, got shape {images.shape}")
    else:
        items = list(images)
    for index, item in enumerate(items):
        label = f"{name}[{index}]"
        if not isinstance(item, np.ndarray) or item.ndim != 3:
            raise ValueError(f"{label}: expected an (H, W, 3) uint8 array, got "
                             f"{getattr(item, 'shape', type(item).__name__)}")
        if item.dtype != np.uint8:
            raise ValueError(f"{label}: images must be uint8, got {item.dtype}")
        if item.shape[-1] != 3 or item.shape[0] < 1 or item.shape[1] < 1:
            raise ValueError(f"{label}: expected (H, W, 3) RGB, got shape {item.shape}")
    return items


def images_to_tensor(images, height: int, width: int, name: str = "images") -> torch.Tensor:
    """uint8 images -> (N, 3, height, width) float32 in [-1, 1]; bicubic resize, no crop."""
    out = []
    for item in image_list(images, name):
        tensor = torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        if tensor.shape[-2:] != (height, width):
            downscale = tensor.shape[-2] > height or tensor.shape[-1] > width
            tensor = F.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False,
                                   antialias=downscale).clamp(-1.0, 1.0)
        out.append(tensor)
    if not out:
        return torch.zeros(0, 3, height, width)
    return torch.cat(out)


def conditioning_video(given_frames: torch.Tensor | None, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The shot's conditioning video (3, F, H, W): the given frames first, zeros after."""
    video = torch.zeros(3, num_frames, height, width)
    if given_frames is not None and len(given_frames):
        if len(given_frames) >= num_frames:
            raise ValueError(f"{len(given_frames)} conditioning frames leave nothing to generate in {num_frames} frames")
        video[:, : len(given_frames)] = given_frames.permute(1, 0, 2, 3)
    return video


def condition_mask(num_memory: int, num_frames: int, num_given_frames: int,
                   latent_height: int, latent_width: int, fix_mem: int | None = None) -> torch.Tensor:
    """Mask (4, M + f, h, w): 1 for memory frames and the given pixel frames, Wan-packed.

    `fix_mem` (the reference's optional argument): memory frames after the first `fix_mem`
    get the value 2 instead of 1; None marks every memory frame 1 (what the reference's
    story pipeline does)."""
    if fix_mem is not None and (isinstance(fix_mem, bool) or not isinstance(fix_mem, int) or fix_mem < 0):
        raise ValueError(f"fix_mem must be None or an int >= 0, got {fix_mem!r}")
    flags = torch.zeros(num_frames)
    flags[:num_given_frames] = 1.0
    packed = torch.cat([flags[:1].repeat(VAE_TEMPORAL_STRIDE), flags[1:]])  # 4 + (F - 1) values
    shot = packed.view(-1, VAE_TEMPORAL_STRIDE).t()  # (4, f): channel c of latent frame j
    memory = torch.ones(MASK_CHANNELS, num_memory)
    if fix_mem is not None:
        memory[:, fix_mem:] = 2.0
    mask = torch.cat([memory, shot], dim=1)
    return mask[:, :, None, None].expand(-1, -1, latent_height, latent_width).contiguous()


def memory_then_shot(memory_latents: torch.Tensor | None, shot_latents: torch.Tensor) -> torch.Tensor:
    """The latent time layout (16, M + f, h, w): memory latents (M, 16, 1, h, w) first, then
    the shot's latents (16, f, h, w). `y`'s latent part and, in training, the clean latent
    the noise is added to are laid out this way."""
    _, f, h, w = shot_latents.shape
    if memory_latents is None or len(memory_latents) == 0:
        memory = shot_latents.new_zeros(LATENT_CHANNELS, 0, h, w)
    else:
        memory = memory_latents[:, :, 0].permute(1, 0, 2, 3).to(shot_latents)
    return torch.cat([memory, shot_latents], dim=1)


def build_condition(memory_latents: torch.Tensor | None, shot_condition_latents: torch.Tensor,
                    num_frames: int, num_given_frames: int, fix_mem: int | None = None) -> torch.Tensor:
    """y (20, M + f, h, w) from memory latents (M, 16, 1, h, w) and the shot's (16, f, h, w)."""
    _, f, h, w = shot_condition_latents.shape
    latents = memory_then_shot(memory_latents, shot_condition_latents)
    num_memory = latents.shape[1] - f
    mask = condition_mask(num_memory, num_frames, num_given_frames, h, w, fix_mem).to(latents)
    if mask.shape[1] != latents.shape[1]:
        raise ValueError(f"mask has {mask.shape[1]} latent frames but the latents have {latents.shape[1]}")
    return torch.cat([mask, latents], dim=0)


@dataclass(frozen=True)
class M2VInputs:
    """What an M2V shot feeds the expert besides the noisy latent: `y` (20, M + f, h, w),
    concatenated to the noisy latent on channels, and the temporal RoPE positions (M + f,);
    the first `num_memory` latent frames are the memory."""

    y: torch.Tensor
    positions: torch.Tensor
    num_memory: int


def m2v_inputs(memory_latents: torch.Tensor | None, shot_condition_latents: torch.Tensor,
               num_frames: int, num_given_frames: int, rope_shift: int | None,
               fix_mem: int | None = None) -> M2VInputs:
    """`y` and the RoPE positions of an M2V/MI2V/MM2V shot (docs/method.md#conditioning-layout-and-mask,
    #negative-rope-shift).

    memory_latents: (M, 16, 1, h, w), each keyframe VAE-encoded as its own 1-frame video
    (None or M = 0: no memory); shot_condition_latents: (16, f, h, w), the VAE encoding of
    the shot's conditioning video (`conditioning_video`: zeros, first frame or 5 motion
    frames, then zeros); num_frames: the shot's pixel frames; num_given_frames: 0, 1 or 5;
    rope_shift: S (None/0: contiguous positions); fix_mem: see `condition_mask`.
    """
    f = shot_condition_latents.shape[1]
    if f != num_latent_frames(num_frames):
        raise ValueError(f"the conditioning latents have {f} latent frames, {num_frames} pixel frames "
                         f"make {num_latent_frames(num_frames)}")
    y = build_condition(memory_latents, shot_condition_latents, num_frames, num_given_frames, fix_mem=fix_mem)
    positions = memory_rope_positions(y.shape[1] - f, f, rope_shift)
    return M2VInputs(y=y, positions=positions, num_memory=y.shape[1] - f)


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video (3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    video = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()


def given_frame_count(first_frame, motion_frames) -> int:
    if first_frame is not None and motion_frames is not None:
        raise ValueError("give either first_frame (MI2V) or motion_frames (MM2V), not both")
    if first_frame is not None:
        return 1
    if motion_frames is not None:
        return MOTION_FRAMES
    return 0

