"""Scorers for keyframe selection and evaluation, behind one batch interface.

`build_scorers("tiny")` gives the tiny random CLIP and aesthetic gate used by tests and the
demo; `build_scorers(ScorerSpec(clip_checkpoint=..., ...))` loads real checkpoints from
local files. Both go through `scorers.factory`, the one place scorers are built.

This package is also imported inside the separate HPS environment (older transformers, no
open_clip): everything heavy (torch, open_clip) is imported lazily, on first use.
"""
from __future__ import annotations

from typing import Any, Mapping

from storymem_model.model_identity import (AESTHETIC_GATE_THRESHOLD, HPS_GATE_THRESHOLD,
                                           TINY_GATE_THRESHOLD)
from storymem_model.scorers.base import (ImageEmbedder, ImageScorer, KeyframeScorers,
                                         ScorerError, check_image_batch, check_prompts)
from storymem_model.spec_json import SpecError
from storymem_model.specs import ScorerSpec

_LAZY = {
    "OpenClipEmbedder": "storymem_model.scorers.clip_embedder",
    "AestheticScorer": "storymem_model.scorers.aesthetic_scorer",
    "load_aesthetic_head": "storymem_model.scorers.aesthetic_scorer",
}

__all__ = ["AESTHETIC_GATE_THRESHOLD", "HPS_GATE_THRESHOLD", "TINY_GATE_THRESHOLD",
           "ImageEmbedder", "ImageScorer", "KeyframeScorers", "ScorerError", "ScorerSpec",
           "build_scorers", "check_image_batch", "check_prompts", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_scorer_spec(value: str | ScorerSpec | Mapping[str, Any]) -> ScorerSpec:
    """"tiny", a ScorerSpec or a dict of its fields, as a ScorerSpec (ScorerError if bad)."""
    try:
        if isinstance(value, ScorerSpec):
            return value
        if isinstance(value, str):
            return ScorerSpec(preset=value)
        if isinstance(value, Mapping):
            return ScorerSpec.from_dict(dict(value))
    except SpecError as exc:
        raise ScorerError(str(exc)) from None
    raise ScorerError(f"build_scorers: expected 'tiny', a ScorerSpec or a dict, "
                      f"got {type(value).__name__}")


def build_scorers(spec: str | ScorerSpec | Mapping[str, Any] = "tiny", *,
                  gate: ImageScorer | None = None, gate_threshold: float | None = None,
                  device: str | None = None) -> KeyframeScorers:
    """Embedder + quality gate + gate threshold for keyframe selection.

    - `"tiny"`: tiny random CLIP and a tiny aesthetic head on it, threshold
      `TINY_GATE_THRESHOLD`.
    - a `ScorerSpec` (or a dict of its fields): CLIP from `clip_checkpoint`; the gate is the
      LAION aesthetic predictor (threshold `AESTHETIC_GATE_THRESHOLD`) or HPSv3
      (`HPS_GATE_THRESHOLD`).
    - `gate=` any ImageScorer replaces the spec's gate; its threshold is `gate_threshold`,
      else its `default_threshold` attribute.
    """
    from storymem_model.scorers.factory import build_embedder, build_keyframe_scorers

    spec = as_scorer_spec(spec)
    changes = {k: v for k, v in (("gate_threshold", gate_threshold), ("device", device))
               if v is not None}
    if changes:
        spec = spec.replace(**changes)
    if gate is None:
        return build_keyframe_scorers(spec)
    threshold = gate_threshold if gate_threshold is not None else getattr(
        gate, "default_threshold", None)
    if threshold is None:
        raise ScorerError(f"gate {getattr(gate, 'name', gate)!r} has no default_threshold; "
                          "pass gate_threshold=")
    if not isinstance(gate, ImageScorer):
        raise ScorerError(f"gate {gate!r} does not follow the ImageScorer protocol "
                          "(name, score_images)")
    return KeyframeScorers(embedder=build_embedder(spec), gate=gate,
                           gate_threshold=float(threshold))
