"""The one place evaluation encoders are loaded from their specs (`encoder_spec`).

* `build_video_encoder(spec)`: ViCLIP from its checkpoint, the CLIP frame average over an
  open_clip checkpoint, or their tiny random variants; also takes a short name ("tiny",
  "tiny-clip" or a ViCLIP checkpoint path) for tests and notebooks;
* `build_aesthetic(spec)`: the LAION aesthetic predictor (head on CLIP ViT-L/14) or the
  tiny random head on the tiny CLIP;
* `build_encoders(spec)`: both, as an evaluation takes them (`Encoders`). When the CLIP
  frame average uses the aesthetic predictor's own CLIP file, that ViT-L/14 loads once.

Every file is local; nothing is downloaded. A missing or malformed file raises a
`ValueError` subclass naming it (`VideoEncoderError`, `ScorerError`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from storymem_model.evaluation.encoder_spec import (AestheticSpec, EvalEncoderSpec,
                                                    VideoEncoderSpec)
from storymem_model.evaluation.video_encoders import (ClipFrameAverageEncoder, ViCLIPEncoder,
                                                      VideoEncoderError, VideoTextEncoder,
                                                      tiny_viclip_encoder)
from storymem_model.scorers.base import ImageEmbedder, ImageScorer

VIDEO_ENCODER_NAMES = {
    "tiny": VideoEncoderSpec(kind="viclip", preset="tiny"),
    "tiny-viclip": VideoEncoderSpec(kind="viclip", preset="tiny"),
    "tiny-clip": VideoEncoderSpec(kind="clip", preset="tiny"),
}


@dataclass(frozen=True)
class Encoders:
    """Loaded evaluation encoders and the spec they were built from."""

    video: VideoTextEncoder
    aesthetic: ImageScorer
    spec: EvalEncoderSpec

    @property
    def aesthetic_frames(self) -> int | None:
        return self.spec.aesthetic.frames

    @property
    def any_tiny(self) -> bool:
        """Whether a tiny random encoder is used (its numbers mean nothing)."""
        return self.spec.video.is_tiny or self.spec.aesthetic.is_tiny


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_video_encoder(spec: VideoEncoderSpec | str, device: str | None = None,
                        clip_embedder: ImageEmbedder | None = None) -> VideoTextEncoder:
    """The video-text encoder `spec` names. A string is a short name: "tiny" (or
    "tiny-viclip"), "tiny-clip", or a ViCLIP checkpoint file / folder holding one.
    `clip_embedder`: an already loaded CLIP for the frame average (kind "clip")."""
    if isinstance(spec, str):
        spec = _named_video_encoder(spec)
    device = device or default_device()
    if spec.kind == "viclip":
        if spec.viclip is not None:
            return ViCLIPEncoder.from_checkpoint(spec.viclip, device=device)
        return tiny_viclip_encoder(device=device)
    if clip_embedder is None:
        from storymem_model.scorers.clip_embedder import OpenClipEmbedder

        clip_embedder = (OpenClipEmbedder(spec.clip_model, spec.clip_checkpoint, device=device)
                         if spec.clip_checkpoint is not None
                         else OpenClipEmbedder.tiny(device=device))
    return ClipFrameAverageEncoder(clip_embedder)


def _named_video_encoder(name: str) -> VideoEncoderSpec:
    if name in VIDEO_ENCODER_NAMES:
        return VIDEO_ENCODER_NAMES[name]
    if os.path.exists(name):
        return VideoEncoderSpec(kind="viclip", viclip=name)
    raise VideoEncoderError(f"unknown video encoder {name!r}: use "
                            f"{', '.join(repr(n) for n in VIDEO_ENCODER_NAMES)} or a ViCLIP "
                            "checkpoint path")


def build_aesthetic(spec: AestheticSpec, device: str | None = None) -> ImageScorer:
    """The aesthetic predictor `spec` names."""
    from storymem_model.scorers.aesthetic_scorer import AestheticScorer

    device = device or default_device()
    if spec.head is not None:
        return AestheticScorer.from_checkpoint(spec.head, spec.clip_checkpoint,
                                               spec.clip_model, device=device)
    from storymem_model.scorers.clip_embedder import OpenClipEmbedder

    return AestheticScorer.tiny(OpenClipEmbedder.tiny(device=device))


def build_encoders(spec: EvalEncoderSpec) -> Encoders:
    """Load the aesthetic predictor, then the video-text encoder (sharing the predictor's
    CLIP when `spec.shares_clip`)."""
    device = spec.device or default_device()
    aesthetic = build_aesthetic(spec.aesthetic, device)
    shared = aesthetic.embedder if spec.shares_clip else None
    video = build_video_encoder(spec.video, device, clip_embedder=shared)
    return Encoders(video=video, aesthetic=aesthetic, spec=spec)
