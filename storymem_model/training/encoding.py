"""VAE latents and UMT5 caption embeddings of a clip, made by the pipeline's own methods.

Training must see the latents inference sees, so nothing is encoded here by new code: a
`StoryMemPipeline` holds the model's VAE, tokenizer and text encoder, and

* the clip (the shot to learn) is VAE-encoded as one video by `_vae_encode` (normalised
  with the VAE's latents_mean / latents_std, as every latent of the pipeline);
* its conditioning videos - all zeros (M2V), first frame + zeros (MI2V), first 5 frames +
  zeros (MM2V) - by `_shot_condition_latents`, the method a render calls;
* its keyframes, the memory other clips of its group will see, by `encode_keyframes` (each
  keyframe its own 1-frame video, as the memory bank caches them);
* its caption by `prompt_encoder` (UMT5, zero after the caption's own tokens).

Encoding needs no transformer. The tiny preset builds its whole (tiny) pipeline; for real
folders only the VAE, tokenizer and text encoder are loaded and the pipeline gets two tiny
placeholder experts that never run (`build_encoding_pipeline`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storymem_model import conditioning as cond
from storymem_model.specs import ModelSpec

MOTION_FRAMES = cond.MOTION_FRAMES


@dataclass
class ClipLatents:
    """Everything training needs from one clip (float32, CPU)."""

    clip: torch.Tensor          # (16, f, h, w) the shot itself
    mi2v_condition: torch.Tensor  # (16, f, h, w) conditioning latents, first frame given
    mm2v_condition: torch.Tensor  # (16, f, h, w) conditioning latents, 5 frames given
    keyframes: torch.Tensor     # (K, 16, 1, h, w) this clip's keyframes as memory latents
    caption: torch.Tensor       # (n, D) the caption's embedding rows before the zero padding


def build_encoding_pipeline(model: ModelSpec):
    """A StoryMemPipeline able to encode (VAE + text) for a resolved ModelSpec."""
    from storymem_model.model_loading import build_pipeline

    if model.preset is not None:
        return build_pipeline(model)
    return _components_pipeline(model)


def _components_pipeline(model: ModelSpec):
    from storymem_model import model_loading as ml
    from storymem_model.presets import REAL_SHOT, REAL_TEXT_LENGTH, TINY
    from storymem_model.shot_pipeline import StoryMemPipeline
    from storymem_model.tiny_models import build_tiny_transformer

    base = ml.components_folder(Path(model.model_dir), model.components_dir)
    dtype = ml._resolve_dtype(model.dtype) or ml.default_dtype(torch.device(model.device or "cpu"))
    parts = ml.load_shared_components(base, dtype)
    ml.cast_keeping_fp32_modules(parts["text_encoder"], dtype)
    placeholders = [build_tiny_transformer(36, TINY).eval() for _ in range(2)]  # never run
    pipeline = StoryMemPipeline(**parts, transformer=placeholders[0], transformer_2=placeholders[1])
    pipeline.to(torch.device(model.device or "cpu"))
    pipeline.configure(shot=REAL_SHOT, text_length=REAL_TEXT_LENGTH)
    return pipeline


def frames_to_video(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) in [-1, 1] through the pipeline's image path."""
    return cond.images_to_tensor(frames, height, width, name="clip frames").permute(1, 0, 2, 3)


def caption_rows(embedding: torch.Tensor) -> torch.Tensor:
    """(L, D) zero-padded caption embedding -> its rows up to the last non-zero one."""
    nonzero = embedding.abs().sum(dim=1) > 0
    count = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 0
    return embedding[:count].clone()


def padded_caption(rows: torch.Tensor, text_length: int) -> torch.Tensor:
    """The inverse of `caption_rows`: (n, D) -> (text_length, D), zeros after row n."""
    out = rows.new_zeros(text_length, rows.shape[1])
    out[: len(rows)] = rows
    return out


@torch.no_grad()
def encode_clip(pipeline, frames: np.ndarray, keyframe_indices: list[int], caption: str) -> ClipLatents:
    """The latents of one decoded clip (frames already at the training size)."""
    num_frames, height, width, _ = frames.shape
    if num_frames <= MOTION_FRAMES:
        raise ValueError(f"a training clip needs more than {MOTION_FRAMES} frames, got {num_frames}")
    video = frames_to_video(frames, height, width)
    clip = pipeline._vae_encode(video[None])[0].cpu()
    first = cond.images_to_tensor(frames[:1], height, width, name="first_frame")
    motion = cond.images_to_tensor(frames[:MOTION_FRAMES], height, width, name="motion_frames")
    mi2v = pipeline._shot_condition_latents(first, num_frames, height, width).cpu()
    mm2v = pipeline._shot_condition_latents(motion, num_frames, height, width).cpu()
    keyframes = pipeline.encode_keyframes(frames[list(keyframe_indices)], height, width).cpu()
    embedding = pipeline.prompt_encoder.encode([caption], pipeline.device)[0].float().cpu()
    return ClipLatents(clip=clip, mi2v_condition=mi2v, mm2v_condition=mm2v, keyframes=keyframes,
                       caption=caption_rows(embedding))


@torch.no_grad()
def zero_condition(pipeline, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The M2V conditioning latents (all-zero video), the same for every clip."""
    return pipeline._shot_condition_latents(None, num_frames, height, width).cpu()
