"""Which encoders an evaluation scores with: typed, frozen, JSON-serialisable specs.

Built once at the edge (the `storymem eval` / `storymem bench-stbench` flags), validated on
construction, and turned into loaded models only by `encoder_factory.build_encoders`:

* `VideoEncoderSpec`: the video-text encoder behind prompt following and cross-shot
  consistency: ViCLIP (the paper's; a checkpoint file or a folder holding one) or the
  mean of CLIP frame embeddings (an open_clip checkpoint);
* `AestheticSpec`: the LAION aesthetic predictor (a head file on CLIP ViT-L/14) and how
  many frames per shot it scores;
* `EvalEncoderSpec`: both, plus the torch device they run on.

`preset="tiny"` stands in for every file that is not given: tiny random encoders whose
numbers only show that the code runs. Nothing here imports torch or reads a weight.
"""
from __future__ import annotations

from dataclasses import dataclass

from storymem_model.spec_json import Spec, check_choice, check_number
from storymem_model.specs import AESTHETIC_CLIP_MODEL, PRESETS

VIDEO_ENCODER_KINDS = ("viclip", "clip")
DEFAULT_VIDEO_CLIP_MODEL = AESTHETIC_CLIP_MODEL  # OpenAI CLIP ViT-L/14, open_clip's name


def _check_text(problems: list[str], name: str, value) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        problems.append(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class VideoEncoderSpec(Spec):
    """The video-text encoder: `kind` "viclip" (file `viclip`) or "clip" (the CLIP frame
    average over `clip_checkpoint`, an open_clip `clip_model`); `preset="tiny"` builds the
    tiny random variant of `kind` when its file is not given."""

    kind: str = "viclip"
    viclip: str | None = None
    clip_checkpoint: str | None = None
    clip_model: str = DEFAULT_VIDEO_CLIP_MODEL
    preset: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        check_choice(out, "kind", self.kind, VIDEO_ENCODER_KINDS)
        if self.preset is not None:
            check_choice(out, "preset", self.preset, PRESETS)
        for name in ("viclip", "clip_checkpoint", "clip_model"):
            _check_text(out, name, getattr(self, name))
        if self.kind == "viclip":
            if self.clip_checkpoint is not None:
                out.append("clip_checkpoint is for the CLIP frame average (kind clip), not "
                           "for ViCLIP")
            if self.viclip is None and self.preset is None:
                out.append("no video-text encoder: give a ViCLIP checkpoint (viclip), or "
                           "kind clip with a CLIP checkpoint, or the tiny preset")
        elif self.kind == "clip":
            if self.viclip is not None:
                out.append("viclip is a ViCLIP checkpoint; kind clip averages CLIP frame "
                           "embeddings")
            if self.clip_checkpoint is None and self.preset is None:
                out.append("the CLIP frame average (kind clip) needs clip_checkpoint, a "
                           "local open_clip weights file (or the tiny preset)")
        return out

    @property
    def is_tiny(self) -> bool:
        """Whether the encoder is a tiny random one (no file given)."""
        file = self.viclip if self.kind == "viclip" else self.clip_checkpoint
        return file is None


@dataclass(frozen=True)
class AestheticSpec(Spec):
    """The LAION aesthetic predictor: `head` (its weights) on the CLIP ViT-L/14 of
    `clip_checkpoint`; `preset="tiny"`: a tiny random head on the tiny CLIP when no file is
    given. `frames`: score that many evenly spaced frames per shot (None: every frame)."""

    head: str | None = None
    clip_checkpoint: str | None = None
    clip_model: str = AESTHETIC_CLIP_MODEL
    frames: int | None = None
    preset: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.preset is not None:
            check_choice(out, "preset", self.preset, PRESETS)
        for name in ("head", "clip_checkpoint", "clip_model"):
            _check_text(out, name, getattr(self, name))
        if (self.head is None) != (self.clip_checkpoint is None):
            out.append("the aesthetic predictor needs both its head and its CLIP ViT-L/14 "
                       "checkpoint (clip_checkpoint)")
        elif self.head is None and self.preset is None:
            out.append("no aesthetic predictor: give the LAION predictor head and its CLIP "
                       "ViT-L/14 checkpoint, or the tiny preset")
        check_number(out, "frames", self.frames, minimum=1, integer=True, optional=True)
        return out

    @property
    def is_tiny(self) -> bool:
        return self.head is None


@dataclass(frozen=True)
class EvalEncoderSpec(Spec):
    """Everything an evaluation scores with; `device` None = cuda when available, else cpu
    (resolved when the encoders load)."""

    video: VideoEncoderSpec
    aesthetic: AestheticSpec
    device: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        _check_text(out, "device", self.device)
        return out

    @property
    def shares_clip(self) -> bool:
        """The CLIP frame average runs on the aesthetic predictor's own CLIP (same file and
        model): one ViT-L/14 is loaded for both."""
        return (self.video.kind == "clip" and self.video.clip_checkpoint is not None
                and self.video.clip_checkpoint == self.aesthetic.clip_checkpoint
                and self.video.clip_model == self.aesthetic.clip_model)
