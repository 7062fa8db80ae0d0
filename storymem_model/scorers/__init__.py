"""Scorers for keyframe selection and evaluation, behind one batch interface.

`build_scorers("tiny")` gives the tiny random CLIP and aesthetic gate used by tests and the
demo; `build_scorers(ScorerPaths(...))` loads real checkpoints from local files.

This package is also imported inside the separate HPS environment (older transformers, no
open_clip): everything heavy (torch, open_clip) is imported lazily, on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from storymem_model.scorers.base import (ImageEmbedder, ImageScorer, KeyframeScorers,
                                         ScorerError, check_image_batch, check_prompts)

# Gate thresholds. The reference gates keyframes with HPSv3 >= 3.0 (an HPS scorer passed as
# `gate=` should carry `default_threshold = 3.0`). With the LAION aesthetic predictor as the
# gate we use 4.5, LAION's own "aesthetic 4.5+" cut (our choice; the paper does not use it).
HPS_GATE_THRESHOLD = 3.0
AESTHETIC_GATE_THRESHOLD = 4.5
# Tiny preset: chosen from measured tiny-aesthetic scores so a normal tiny story exercises
# every path (see the README memory section and tests/test_keyframe_selection.py).
TINY_GATE_THRESHOLD = 4.0

_LAZY = {
    "OpenClipEmbedder": "storymem_model.scorers.clip_embedder",
    "AestheticScorer": "storymem_model.scorers.aesthetic_scorer",
    "load_aesthetic_head": "storymem_model.scorers.aesthetic_scorer",
}

__all__ = ["ImageEmbedder", "ImageScorer", "KeyframeScorers", "ScorerError", "ScorerPaths",
           "build_scorers", "check_image_batch", "check_prompts", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ScorerPaths:
    """Local checkpoint files for the real scorers (nothing is ever downloaded)."""

    clip_checkpoint: str
    aesthetic_head: str | None = None
    aesthetic_clip_checkpoint: str | None = None
    clip_model: str = "ViT-B-32-quickgelu"
    aesthetic_clip_model: str = "ViT-L-14-quickgelu"


def build_scorers(preset_or_paths: str | ScorerPaths | Mapping[str, str] = "tiny", *,
                  gate: ImageScorer | None = None, gate_threshold: float | None = None,
                  device: str | None = None, seed: int = 0) -> KeyframeScorers:
    """Embedder + quality gate + gate threshold for keyframe selection.

    - `"tiny"`: tiny random CLIP (seeded by `seed`) and a tiny aesthetic head on it,
      threshold `TINY_GATE_THRESHOLD`.
    - `ScorerPaths` (or a dict with its field names): CLIP from `clip_checkpoint`; the gate
      is the LAION aesthetic predictor (`aesthetic_head` on CLIP ViT-L/14 from
      `aesthetic_clip_checkpoint`), threshold `AESTHETIC_GATE_THRESHOLD`.
    - `gate=` any ImageScorer (e.g. the HPSv3 scorer) replaces the aesthetic gate; its
      threshold is `gate_threshold`, else its `default_threshold` attribute.
    """
    if isinstance(preset_or_paths, str):
        if preset_or_paths != "tiny":
            raise ScorerError(f"unknown scorer preset {preset_or_paths!r}: use 'tiny' or "
                              "ScorerPaths(clip_checkpoint=..., aesthetic_head=..., ...)")
        from storymem_model.scorers.aesthetic_scorer import AestheticScorer
        from storymem_model.scorers.clip_embedder import OpenClipEmbedder
        embedder = OpenClipEmbedder.tiny(seed=seed, device=device)
        if gate is None:
            gate = AestheticScorer.tiny(embedder)
            default = TINY_GATE_THRESHOLD
        else:
            default = getattr(gate, "default_threshold", None)
    else:
        paths = _as_paths(preset_or_paths)
        from storymem_model.scorers.aesthetic_scorer import AestheticScorer
        from storymem_model.scorers.clip_embedder import OpenClipEmbedder
        embedder = OpenClipEmbedder(paths.clip_model, paths.clip_checkpoint, device=device)
        if gate is None:
            if not paths.aesthetic_head or not paths.aesthetic_clip_checkpoint:
                raise ScorerError("no quality gate: give aesthetic_head and "
                                  "aesthetic_clip_checkpoint, or gate= (e.g. the HPSv3 scorer)")
            gate = AestheticScorer.from_checkpoint(
                paths.aesthetic_head, paths.aesthetic_clip_checkpoint,
                paths.aesthetic_clip_model, device=device)
            default = AESTHETIC_GATE_THRESHOLD
        else:
            default = getattr(gate, "default_threshold", None)
    threshold = gate_threshold if gate_threshold is not None else default
    if threshold is None:
        raise ScorerError(f"gate {getattr(gate, 'name', gate)!r} has no default_threshold; "
                          "pass gate_threshold=")
    if not isinstance(gate, ImageScorer):
        raise ScorerError(f"gate {gate!r} does not follow the ImageScorer protocol "
                          "(name, score_images)")
    return KeyframeScorers(embedder=embedder, gate=gate, gate_threshold=float(threshold))


def _as_paths(value) -> ScorerPaths:
    if isinstance(value, ScorerPaths):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(ScorerPaths)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ScorerError(f"unknown scorer path keys {unknown}; known: {sorted(known)}")
        if not value.get("clip_checkpoint"):
            raise ScorerError("scorer paths need clip_checkpoint (a local CLIP weights file)")
        return ScorerPaths(**value)
    raise ScorerError(f"build_scorers: expected 'tiny', ScorerPaths or a dict, "
                      f"got {type(value).__name__}")
