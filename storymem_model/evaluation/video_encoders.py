"""Video-text encoders for ST-Bench evaluation, loaded from local paths (or tiny and random).

Protocol (`VideoTextEncoder`): `name`, `frames_per_video`, `embed_videos(list of (F, H, W, 3)
uint8) -> (N, D) float32` and `embed_texts(list[str]) -> (N, D) float32`, both
L2-normalised, so `video @ text.T` are cosine similarities.

Two encoders:

- `ViCLIPEncoder`: ViCLIP (InternVid, arXiv 2307.06942), the encoder the StoryMem paper
  scores with. Written here from the paper's description and the released checkpoint's key
  names and shapes (`ViClip-InternVid-10M-FLT.pth`: a dict whose "model" entry holds
  `vision_encoder.*`, `text_encoder.*` and `temp`):
  - vision: a CLIP ViT-L/14 whose patch embedding is a Conv3d with temporal kernel 1
    (`conv1.weight` (1024, 3, 1, 14, 14)), a class token, a spatial position embedding per
    patch (`positional_embedding` (257, 1024)) plus a learned temporal embedding per frame
    (`temporal_positional_embedding` (1, 8, 1024)); the tokens of all 8 frames and the
    class token attend jointly (spatio-temporal attention) through 24 pre-LN blocks
    (nn.MultiheadAttention `attn.in_proj_*`/`attn.out_proj.*`, `mlp.c_fc`/`mlp.c_proj` with
    QuickGELU); the class token after `ln_post` times `proj` (1024, 768) is the video
    embedding;
  - text: a CLIP text transformer (width 768, 12 layers, causal mask, 32-token context,
    end-of-text pooling, `text_projection` (768, 768)). open_clip's `TextTransformer` has
    exactly these parameter names, so it is used as is; open_clip's `Transformer` is also
    the vision block stack.
  Sizes are read from the checkpoint's shapes; heads = width / 64 (CLIP's head size).
  Input as in the released demo: 8 frames sampled at a stride of len // 8 from the first
  frame, resized to 224x224 (bilinear, no crop, no antialias), scaled to [0, 1] and
  normalised with ImageNet mean/std; text tokenised with CLIP's BPE (lower-cased), cut to
  32 tokens (longer texts keep their first 30 word pieces and end-of-text).
- `ClipFrameAverageEncoder`: any CLIP `ImageEmbedder` (storymem_model.scorers protocol):
  the mean of the L2-normalised embeddings of the same 8 sampled frames, re-normalised;
  text through the same CLIP's text tower.

Tiny variants (`tiny_viclip_encoder`, `ClipFrameAverageEncoder` over the tiny CLIP) have
seeded random weights: they exercise the code, their numbers mean nothing. Which encoder an
evaluation uses is a spec (`encoder_spec.VideoEncoderSpec`), loaded by
`encoder_factory.build_video_encoder`.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VICLIP_FRAMES = 8
VICLIP_IMAGE_SIZE = 224
VICLIP_CONTEXT_LENGTH = 32
VICLIP_HEAD_DIM = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# Every tiny ViCLIP size, in one place (its weights are random: a code path, not a model).
TINY_VICLIP = {
    "vision_width": 64, "vision_layers": 2, "patch_size": 8, "image_size": 32,
    "num_frames": VICLIP_FRAMES, "embed_dim": 32,
    "text_width": 64, "text_layers": 2, "context_length": VICLIP_CONTEXT_LENGTH,
    "vocab_size": 49408, "seed": 1234,
}


class VideoEncoderError(ValueError):
    """A video, text or checkpoint an encoder cannot use, with the reason."""


@runtime_checkable
class VideoTextEncoder(Protocol):
    name: str
    frames_per_video: int

    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def sample_frame_indices(num_frames: int, count: int = VICLIP_FRAMES) -> list[int]:
    """`count` frame indices of a `num_frames`-long video.

    At least `count` frames: stride `num_frames // count` from frame 0 (the ViCLIP demo's
    sampling). Fewer: `floor(i * num_frames / count)`, which repeats frames evenly so the
    model still sees `count` frames in order.
    """
    if num_frames < 1:
        raise VideoEncoderError("a video needs at least one frame")
    if count < 1:
        raise VideoEncoderError(f"frames per video must be >= 1, got {count}")
    if num_frames >= count:
        step = num_frames // count
        return [i * step for i in range(count)]
    return [(i * num_frames) // count for i in range(count)]


def check_video(video, index: int = 0) -> np.ndarray:
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.shape[0] < 1:
        raise VideoEncoderError(
            f"video {index} must be a uint8 array (F>=1, H, W, 3), got {array.dtype} {array.shape}")
    return array


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise VideoEncoderError("embed_texts takes a list of strings, not one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise VideoEncoderError(f"text {i} is {type(text).__name__}, not a string")
    return texts


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------
# ViCLIP


@dataclass(frozen=True)
class ViCLIPConfig:
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    patch_size: int = 14
    image_size: int = VICLIP_IMAGE_SIZE
    num_frames: int = VICLIP_FRAMES
    embed_dim: int = 768
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    context_length: int = VICLIP_CONTEXT_LENGTH
    vocab_size: int = 49408
    mlp_ratio: float = 4.0

    @classmethod
    def from_state_dict(cls, state: dict) -> "ViCLIPConfig":
        """Read every size from the checkpoint's tensor shapes."""
        needed = [
            "vision_encoder.conv1.weight", "vision_encoder.positional_embedding",
            "vision_encoder.temporal_positional_embedding", "vision_encoder.proj",
            "text_encoder.token_embedding.weight", "text_encoder.positional_embedding",
            "text_encoder.text_projection",
        ]
        missing = [k for k in needed if k not in state]
        if missing:
            raise VideoEncoderError(f"not a ViCLIP checkpoint: missing {', '.join(missing)}")
        conv = state["vision_encoder.conv1.weight"].shape
        if len(conv) != 5 or conv[2] != 1:
            raise VideoEncoderError(
                f"ViCLIP conv1.weight must be (width, 3, 1, p, p), got {tuple(conv)}")
        vision_width, patch = int(conv[0]), int(conv[-1])
        grid = math.isqrt(int(state["vision_encoder.positional_embedding"].shape[0]) - 1)
        text_width = int(state["text_encoder.token_embedding.weight"].shape[1])
        fc = state.get("vision_encoder.transformer.resblocks.0.mlp.c_fc.weight")
        return cls(
            vision_width=vision_width,
            vision_layers=_count_blocks(state, "vision_encoder.transformer.resblocks."),
            vision_heads=max(1, vision_width // VICLIP_HEAD_DIM),
            patch_size=patch,
            image_size=grid * patch,
            num_frames=int(state["vision_encoder.temporal_positional_embedding"].shape[1]),
            embed_dim=int(state["vision_encoder.proj"].shape[1]),
            text_width=text_width,
            text_layers=_count_blocks(state, "text_encoder.transformer.resblocks."),
            text_heads=max(1, text_width // VICLIP_HEAD_DIM),
            context_length=int(state["text_encoder.positional_embedding"].shape[0]),
            vocab_size=int(state["text_encoder.token_embedding.weight"].shape[0]),
            mlp_ratio=(int(fc.shape[0]) / vision_width) if fc is not None else 4.0,
        )


def _count_blocks(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state for m in [pattern.match(key)] if m}
    if not found:
        raise VideoEncoderError(f"not a ViCLIP checkpoint: no {prefix}* blocks")
    return max(found) + 1


class ViCLIPVisionTower(nn.Module):
    """CLIP ViT with per-frame patches, spatial + temporal position embeddings and joint
    attention over every frame's patches; returns the projected class token."""

    def __init__(self, config: ViCLIPConfig):
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, Transformer

        width, patch = config.vision_width, config.patch_size
        grid = config.image_size // patch
        self.num_frames = config.num_frames
        self.conv1 = nn.Conv3d(3, width, (1, patch, patch), (1, patch, patch), bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, config.num_frames, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(
            width, config.vision_layers, config.vision_heads, mlp_ratio=config.mlp_ratio,
            act_layer=QuickGELU, norm_layer=LayerNorm)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, config.embed_dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """`video` (B, 3, T, H, W), normalised -> (B, embed_dim)."""
        x = self.conv1(video)  # (B, C, T, gh, gw)
        batch, width, frames = x.shape[:3]
        x = x.flatten(3).permute(0, 3, 2, 1)  # (B, patches, T, C)
        spatial = self.positional_embedding[1:].to(x.dtype)
        if spatial.shape[0] != x.shape[1]:
            raise VideoEncoderError(
                f"ViCLIP expects {spatial.shape[0]} patches per frame, got {x.shape[1]}")
        x = x + spatial[None, :, None, :]
        if frames == self.num_frames:
            x = x + self.temporal_positional_embedding.to(x.dtype)[:, None]
        elif frames == 1:
            x = x + self.temporal_positional_embedding.to(x.dtype).mean(1)[:, None]
        else:
            raise VideoEncoderError(f"ViCLIP takes {self.num_frames} frames (or 1), got {frames}")
        x = x.reshape(batch, -1, width)
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype)
        x = torch.cat([cls.expand(batch, 1, width), x], dim=1)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class ViCLIPModel(nn.Module):
    """`vision_encoder` + `text_encoder` + `temp`: the released checkpoint's top level."""

    def __init__(self, config: ViCLIPConfig):
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        self.config = config
        self.vision_encoder = ViCLIPVisionTower(config)
        self.text_encoder = TextTransformer(
            context_length=config.context_length, vocab_size=config.vocab_size,
            width=config.text_width, heads=config.text_heads, layers=config.text_layers,
            output_dim=config.embed_dim, act_layer=QuickGELU, norm_layer=LayerNorm,
            pool_type="argmax")
        self.temp = nn.Parameter(torch.tensor(0.01))

    def init_random(self, seed: int) -> "ViCLIPModel":
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif name.endswith(("ln_pre.weight", "ln_post.weight", "ln_final.weight",
                                    "ln_1.weight", "ln_2.weight")):
                    param.fill_(1.0)
                else:
                    std = 0.02 if param.ndim < 2 else param.shape[-1] ** -0.5
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        return self


def load_checkpoint_state(path: str) -> dict:
    """The flat state dict of a ViCLIP checkpoint file ({"model": {...}} or flat)."""
    if not os.path.isfile(path):
        raise VideoEncoderError(f"ViCLIP checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - name the file and the reason
            raise VideoEncoderError(f"cannot read ViCLIP checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise VideoEncoderError(f"ViCLIP checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def find_viclip_checkpoint(path: str) -> str:
    """A checkpoint file, or the one checkpoint file inside a folder."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(CHECKPOINT_SUFFIXES))
        if len(found) != 1:
            raise VideoEncoderError(
                f"expected one ViCLIP checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)}) in {path}, "
                f"found {found or 'none'}")
        return os.path.join(path, found[0])
    return path


class ViCLIPEncoder:
    """ViCLIP as a `VideoTextEncoder`."""

    def __init__(self, model: ViCLIPModel, name: str = "viclip", device=None, dtype=None,
                 batch_size: int = 4):
        from open_clip.tokenizer import SimpleTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.config = model.config
        self.name = name
        self.frames_per_video = self.config.num_frames
        self.batch_size = int(batch_size)
        self.tokenizer = SimpleTokenizer(context_length=self.config.context_length)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "ViCLIPEncoder":
        file = find_viclip_checkpoint(path)
        state = load_checkpoint_state(file)
        config = ViCLIPConfig.from_state_dict(state)
        model = ViCLIPModel(config)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise VideoEncoderError(
                f"{file} does not match the ViCLIP architecture: "
                f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
        kwargs.setdefault("name", f"viclip:{os.path.basename(file)}")
        return cls(model, **kwargs)

    def preprocess(self, video: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (3, T, S, S) float, sampled, resized, normalised."""
        frames = video[sample_frame_indices(video.shape[0], self.frames_per_video)]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=False)
        x = (x - self._mean) / self._std
        return x.permute(1, 0, 2, 3)

    @torch.inference_mode()
    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        videos = [check_video(v, i) for i, v in enumerate(videos)]
        out = []
        for start in range(0, len(videos), self.batch_size):
            batch = torch.stack([self.preprocess(v) for v in videos[start:start + self.batch_size]])
            out.append(_unit_rows(self.model.vision_encoder(batch.to(self.device, self.dtype))))
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.config.embed_dim), np.float32)
        tokens = self.tokenizer(texts, context_length=self.config.context_length)
        return _unit_rows(self.model.text_encoder(tokens.to(self.device)))


def tiny_viclip_encoder(device=None, **kwargs) -> ViCLIPEncoder:
    """ViCLIP's architecture at tiny sizes with seeded random weights (TINY_VICLIP)."""
    sizes = dict(TINY_VICLIP)
    seed = sizes.pop("seed")
    config = ViCLIPConfig(
        vision_heads=max(1, sizes["vision_width"] // VICLIP_HEAD_DIM),
        text_heads=max(1, sizes["text_width"] // VICLIP_HEAD_DIM), **sizes)
    model = ViCLIPModel(config).init_random(seed)
    kwargs.setdefault("name", "viclip:tiny")
    return ViCLIPEncoder(model, device=device or "cpu", dtype=torch.float32, **kwargs)


def save_viclip_checkpoint(encoder_or_model, path: str) -> None:
    """Write a checkpoint in the released layout ({"model": state dict}); for tests/tools."""
    model = encoder_or_model.model if isinstance(encoder_or_model, ViCLIPEncoder) else encoder_or_model
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state, "config": asdict(model.config)}, path)


# ---------------------------------------------------------------------------------------
# CLIP frame average


class ClipFrameAverageEncoder:
    """Video embedding = re-normalised mean of a CLIP image embedder's sampled frames."""

    def __init__(self, embedder, frames_per_video: int = VICLIP_FRAMES, name: str | None = None):
        for method in ("embed_images", "embed_texts"):
            if not callable(getattr(embedder, method, None)):
                raise VideoEncoderError(f"{type(embedder).__name__} has no {method}()")
        self.embedder = embedder
        self.frames_per_video = int(frames_per_video)
        self.name = name or f"clip-frame-average:{getattr(embedder, 'name', type(embedder).__name__)}"

    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        videos = [check_video(v, i) for i, v in enumerate(videos)]
        if not videos:
            return np.zeros((0, 0), np.float32)
        means = []
        for video in videos:  # one call per video: videos may differ in size
            frames = video[sample_frame_indices(video.shape[0], self.frames_per_video)]
            per_frame = np.asarray(self.embedder.embed_images(frames), dtype=np.float64)
            per_frame = per_frame / np.linalg.norm(per_frame, axis=1, keepdims=True)
            means.append(per_frame.mean(axis=0))
        means = np.stack(means)
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        embeddings = np.asarray(self.embedder.embed_texts(texts), dtype=np.float32)
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
