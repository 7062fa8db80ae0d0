"""Scorer protocols shared by every scorer (CLIP, aesthetic, HPSv3) and their callers.

Kept free of heavy imports (only numpy and the standard library): this module is also
imported inside the separate HPS environment, which has no open_clip and an older torch
stack. Scorers take a batch of images and return one number (or one vector) per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


class ScorerError(ValueError):
    """Bad input to a scorer, or a scorer that cannot be built (names the problem)."""


@runtime_checkable
class ImageEmbedder(Protocol):
    """Images and texts into one L2-normalised embedding space (CLIP-like)."""

    name: str

    def embed_images(self, images) -> np.ndarray:
        """(N, H, W, 3) uint8 images -> (N, D) float32, rows L2-normalised."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> (N, D) float32, rows L2-normalised."""
        ...


@runtime_checkable
class ImageScorer(Protocol):
    """Images (optionally with one prompt each) into one float score per image."""

    name: str

    def score_images(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 images -> (N,) float32 scores (higher is better)."""
        ...


@dataclass(frozen=True)
class KeyframeScorers:
    """What keyframe selection needs: an embedder for similarity and a quality gate.

    A frame may become a keyframe only when `gate.score_images(...) >= gate_threshold`.
    """

    embedder: ImageEmbedder
    gate: ImageScorer
    gate_threshold: float

    @property
    def gate_scores_embeddings(self) -> bool:
        """The gate is a head on this very embedder (`gate.embedder is embedder`) and
        scores embeddings: frames are then embedded once and the gate scores those."""
        return (getattr(self.gate, "embedder", None) is self.embedder
                and hasattr(self.gate, "score_embeddings"))


class FrameEmbedder:
    """`ImageEmbedder` that prepares images as keyframe selection does (`preprocess`:
    "reference" or "direct", keyframe_preprocess.py) before embedding them - for images
    compared with keyframes, e.g. MR2V references."""

    def __init__(self, embedder: ImageEmbedder, preprocess: str):
        self._embedder = embedder
        self._preprocess = preprocess
        self.name = getattr(embedder, "name", "")

    def embed_images(self, images) -> np.ndarray:
        from storymem_model.keyframe_preprocess import frames_for_scoring

        return self._embedder.embed_images(
            frames_for_scoring(check_image_batch(images), self._preprocess))

    def embed_texts(self, texts) -> np.ndarray:
        return self._embedder.embed_texts(texts)


def check_image_batch(images, what: str = "images") -> np.ndarray:
    """Validate and return a (N, H, W, 3) uint8 array; a list of same-size images is stacked.

    Raises ScorerError naming the problem (wrong dtype, rank, channel count, empty batch,
    mixed sizes).
    """
    if isinstance(images, np.ndarray):
        batch = images
    else:
        try:
            items = list(images)
        except TypeError:
            raise ScorerError(f"{what}: expected an array (N, H, W, 3) or a list of images, "
                              f"got {type(images).__name__}") from None
        if not items:
            raise ScorerError(f"{what}: empty batch")
        shapes = {np.asarray(item).shape for item in items}
        if len(shapes) > 1:
            raise ScorerError(f"{what}: images of different sizes in one batch: "
                              f"{sorted(shapes)}; score each size separately")
        batch = np.stack([np.asarray(item) for item in items])
    if batch.ndim == 3 and batch.shape[-1] == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ScorerError(f"{what}: expected shape (N, H, W, 3), got {tuple(batch.shape)}")
    if batch.shape[0] == 0:
        raise ScorerError(f"{what}: empty batch")
    if batch.shape[1] < 1 or batch.shape[2] < 1:
        raise ScorerError(f"{what}: empty image size {tuple(batch.shape[1:3])}")
    if batch.dtype != np.uint8:
        raise ScorerError(f"{what}: expected dtype uint8 (0..255), got {batch.dtype}")
    return batch


def check_prompts(prompts, count: int) -> list[str]:
    """One prompt per image; None means the empty prompt for each (as the reference scores)."""
    if prompts is None:
        return [""] * count
    if isinstance(prompts, str):
        raise ScorerError("prompts: expected one string per image, got a single string")
    prompts = list(prompts)
    if len(prompts) != count:
        raise ScorerError(f"prompts: {len(prompts)} prompts for {count} images")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ScorerError(f"prompts[{index}]: expected str, got {type(prompt).__name__}")
    return prompts

