"""LAION-style aesthetic predictor: a linear head on L2-normalised CLIP image embeddings.

Real use: CLIP ViT-L/14 (OpenAI weights, `ViT-L-14-quickgelu`) plus the predictor head
file. Two head formats load: a single linear layer (`weight` (1, D), `bias` (1,)), as in
LAION's `sa_0_4_vit_l_14_linear.pth`, and the "improved aesthetic predictor" stack
(`layers.{i}.weight/bias`, linear layers with dropout and no activations between them), which
is applied layer after layer. `.pth`/`.pt` (torch.load, weights only) or `.safetensors`.
The score scale is LAION's (roughly 1..10, higher is better).

The tiny variant is a seeded random linear head on the tiny CLIP, scaled to the same 1..10
range; see `TINY_AESTHETIC_*` and storymem_model/scorers/__init__.py for its gate threshold.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import torch

from storymem_model.scorers.fixed_batch import DEFAULT_ROWS, run_fixed
from storymem_model.scorers.base import ImageEmbedder, ScorerError, check_image_batch, \
    check_prompts

AESTHETIC_CLIP_MODEL = "ViT-L-14-quickgelu"  # the predictor was trained on OpenAI ViT-L/14
TINY_AESTHETIC_SEED = 1
TINY_AESTHETIC_BIAS = 5.0   # centre of LAION's scale
TINY_AESTHETIC_GAIN = 8.0   # weight scale: ~1 point of spread on tiny CLIP embeddings

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(weight|bias)$")


def load_aesthetic_head(path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Read a head file into [(weight (out, in), bias (out,)), ...] in application order."""
    if not os.path.isfile(path):
        raise ScorerError(f"aesthetic head file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise ScorerError(f"cannot read aesthetic head {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ScorerError(f"aesthetic head {path}: expected a state dict of tensors")
    if set(state) == {"weight", "bias"}:
        layers = [(state["weight"], state["bias"])]
    else:
        found: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            match = _LAYER_KEY.match(key)
            if match is None:
                raise ScorerError(
                    f"aesthetic head {path}: unexpected key {key!r}; expected 'weight'/'bias' "
                    "or 'layers.{i}.weight'/'layers.{i}.bias'")
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value
        if not found:
            raise ScorerError(f"aesthetic head {path}: no layers in the file")
        layers = []
        for index in sorted(found):
            if set(found[index]) != {"weight", "bias"}:
                raise ScorerError(f"aesthetic head {path}: layer {index} lacks weight or bias")
            layers.append((found[index]["weight"], found[index]["bias"]))
    for index, (weight, bias) in enumerate(layers):
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ScorerError(f"aesthetic head {path}: layer {index} has weight "
                              f"{tuple(weight.shape)} and bias {tuple(bias.shape)}")
        if index and weight.shape[1] != layers[index - 1][0].shape[0]:
            raise ScorerError(f"aesthetic head {path}: layer {index} takes "
                              f"{weight.shape[1]} inputs, previous layer gives "
                              f"{layers[index - 1][0].shape[0]}")
    if layers[-1][0].shape[0] != 1:
        raise ScorerError(f"aesthetic head {path}: last layer gives "
                          f"{layers[-1][0].shape[0]} outputs, expected 1")
    return [(w.float(), b.float()) for w, b in layers]


class AestheticScorer:
    """`ImageScorer`: CLIP image embedding -> linear head -> one score per image."""

    def __init__(self, embedder: ImageEmbedder, layers: list[tuple[torch.Tensor, torch.Tensor]],
                 name: str = "aesthetic"):
        embed_dim = getattr(embedder, "embed_dim", None)
        if embed_dim is not None and layers[0][0].shape[1] != embed_dim:
            raise ScorerError(f"aesthetic head takes {layers[0][0].shape[1]}-dim embeddings, "
                              f"but the CLIP {getattr(embedder, 'name', '?')} gives {embed_dim}")
        self.embedder = embedder
        self.layers = layers
        self.name = name
        self.batch_size = int(getattr(embedder, "batch_size", DEFAULT_ROWS))

    @classmethod
    def from_checkpoint(cls, head_path: str, clip_checkpoint: str,
                        clip_model: str = AESTHETIC_CLIP_MODEL, **clip_kwargs) -> "AestheticScorer":
        from storymem_model.scorers.clip_embedder import OpenClipEmbedder
        layers = load_aesthetic_head(head_path)  # fail fast before loading a large CLIP
        clip_kwargs.setdefault("resize_mode", "center_crop")  # as the predictor was trained
        embedder = OpenClipEmbedder(clip_model, clip_checkpoint, **clip_kwargs)
        return cls(embedder, layers, name=f"aesthetic:{os.path.basename(head_path)}")

    @classmethod
    def tiny(cls, embedder: ImageEmbedder | None = None,
             seed: int = TINY_AESTHETIC_SEED) -> "AestheticScorer":
        """Seeded random linear head on the tiny CLIP (its embeddings are 64-dim)."""
        if embedder is None:
            from storymem_model.scorers.clip_embedder import OpenClipEmbedder
            embedder = OpenClipEmbedder.tiny()
        generator = torch.Generator().manual_seed(seed)
        dim = getattr(embedder, "embed_dim", None) or embedder.embed_texts([""]).shape[1]
        weight = torch.randn(1, dim, generator=generator) * (TINY_AESTHETIC_GAIN / dim ** 0.5)
        bias = torch.full((1,), TINY_AESTHETIC_BIAS)
        return cls(embedder, [(weight, bias)], name=f"aesthetic:tiny-seed{seed}")

    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) L2-normalised CLIP embeddings -> (N,) float32 scores."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.layers[0][0].shape[1]:
            raise ScorerError(f"aesthetic head expects (N, {self.layers[0][0].shape[1]}) "
                              f"embeddings, got {tuple(x.shape)}")

        def forward(rows: np.ndarray) -> np.ndarray:
            y = torch.as_tensor(rows)
            for weight, bias in self.layers:
                y = torch.nn.functional.linear(y, weight, bias)
            return y[:, 0].numpy()

        filler = np.zeros(x.shape[1], dtype=np.float32)  # padding rows: a unit vector,
        filler[0] = 1.0  # dropped after the forward
        return run_fixed(forward, x.numpy(), self.batch_size, filler).astype(np.float32)

    def score_images(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        batch = check_image_batch(images)
        check_prompts(prompts, len(batch))  # the aesthetic score ignores prompts
        return self.score_embeddings(self.embedder.embed_images(batch))
