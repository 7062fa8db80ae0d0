"""The two per-clip steps of `storymem train prepare`, without Ray (docs/training.md#preparation).

1. `analyse_clip`: read and decode one clip to the training frames, embed and gate-score
   every frame once and pick its keyframes with the render's keyframe selection
   (`keyframe_selection.extract_keyframes`), keep the mean CLIP embedding for grouping.
   A clip that cannot be used gives a `ClipError` row instead.
2. `encode_shard`: for the clips of whole groups, decode again (ffmpeg is deterministic),
   encode latents and captions (`encoding.encode_clip`) and give each clip its memory
   candidates: the keyframe latents of the other clips of its group, in group order,
   chosen by the memory-bank policy when there are more than `memory_candidates`.

`pipelines/training/prepare.py` runs both as Ray Data stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from storymem_model.memory_bank import memory_indices
from storymem_model.records import Record, arrow_field
from storymem_model.training.clip_manifest import ClipError, ClipInput
from storymem_model.training.clips import ClipDecodeError, decode_clip, read_clip_bytes
from storymem_model.training.specs import PrepareSpec

MEGABYTE = 1 << 20


@dataclass(frozen=True)
class ClipAnalysis(Record):
    """A usable clip after step 1 (a row of `clips.parquet` once grouped)."""

    clip_id: str
    clip_uri: str
    caption: str
    position: int
    keyframe_indices: list = arrow_field("list<int32>")
    embedding: list = arrow_field("list<float32>")
    given_group: str | None = None
    given_order: int | None = None
    group_id: str | None = None
    order: int | None = None


def decode_for_training(clip_uri: str, spec: PrepareSpec) -> np.ndarray:
    data = read_clip_bytes(clip_uri, int(spec.max_clip_mb * MEGABYTE))
    return decode_clip(data, num_frames=spec.num_frames, fps=spec.fps, height=spec.height,
                       width=spec.width)


def analyse_clip(clip: ClipInput, spec: PrepareSpec, scorers) -> ClipAnalysis | ClipError:
    """Step 1 for one clip; `scorers` are the `KeyframeScorers` of `spec.scorers`."""
    from storymem_model.keyframe_selection import extract_keyframes
    from storymem_model.training.grouping import normalised_mean

    try:
        frames = decode_for_training(clip.clip_uri, spec)
    except ClipDecodeError as exc:
        return ClipError(clip_uri=clip.clip_uri, stage="decode", reason=str(exc), position=clip.position,
                         clip_id=clip.clip_id, caption=clip.caption)
    selected = extract_keyframes(frames, scorers, preprocess=spec.scorers.keyframe_preprocess,
                                 threshold=spec.keyframe_threshold, max_keyframes=spec.max_keyframes)
    return ClipAnalysis(
        clip_id=clip.clip_id, clip_uri=clip.clip_uri, caption=clip.caption, position=clip.position,
        keyframe_indices=[int(i) for i in selected.indices],
        embedding=normalised_mean(selected.embeddings).tolist(),
        given_group=clip.group_id, given_order=clip.order)


def memory_candidates(group: list[ClipAnalysis], keyframes: dict[str, torch.Tensor], clip_id: str,
                      limit: int, sink: int) -> tuple[torch.Tensor, list[str]]:
    """(M, 16, 1, h, w) keyframe latents of the other clips of `group` (in group order) and
    their sources "{clip_id}:{frame}", at most `limit` (memory-bank policy)."""
    latents, sources = [], []
    for other in group:
        if other.clip_id == clip_id:
            continue
        for index, latent in zip(other.keyframe_indices, keyframes[other.clip_id]):
            latents.append(latent)
            sources.append(f"{other.clip_id}:{index}")
    keep = memory_indices(len(latents), limit, sink)
    if not keep:
        return torch.zeros(0, *_latent_frame_shape(keyframes)), []
    return torch.stack([latents[i] for i in keep]), [sources[i] for i in keep]


def _latent_frame_shape(keyframes: dict[str, torch.Tensor]) -> tuple[int, ...]:
    for tensor in keyframes.values():
        return tuple(tensor.shape[1:])
    return (16, 1, 0, 0)


def encode_shard(clips: list[ClipAnalysis], spec: PrepareSpec, pipeline) -> list[dict]:
    """Step 2: the shard rows of these clips (whole groups; each clip's `group_id`/`order`
    set), in (group, order) order."""
    from storymem_model.training.encoding import encode_clip
    from storymem_model.training.prepared import shard_row

    ordered = sorted(clips, key=lambda c: (c.group_id, c.order))
    encoded = {}
    for clip in ordered:
        try:
            frames = decode_for_training(clip.clip_uri, spec)
        except ClipDecodeError as exc:
            raise ClipDecodeError(f"{clip.clip_uri}: decoded in the analysis but not now ({exc}); "
                                  "did the file change? prepare again") from None
        encoded[clip.clip_id] = encode_clip(pipeline, frames, clip.keyframe_indices, clip.caption)
    keyframes = {clip_id: latents.keyframes for clip_id, latents in encoded.items()}
    groups: dict[str, list[ClipAnalysis]] = {}
    for clip in ordered:
        groups.setdefault(clip.group_id, []).append(clip)
    rows = []
    for clip in ordered:
        memory, sources = memory_candidates(groups[clip.group_id], keyframes, clip.clip_id,
                                            spec.memory_candidates, spec.memory_sink)
        rows.append(shard_row(clip_id=clip.clip_id, clip_uri=clip.clip_uri, caption=clip.caption,
                              group_id=clip.group_id, order=clip.order, position=clip.position,
                              keyframe_indices=clip.keyframe_indices, latents=encoded[clip.clip_id],
                              memory=memory, memory_sources=sources))
    return rows
