"""Rows of the fit's tables: `metrics.parquet` (one per optimiser step) and
`validation.parquet` (one per `--validate-every` render)."""
from __future__ import annotations

from dataclasses import dataclass

from storymem_model.records import Record


@dataclass(frozen=True)
class MetricRow(Record):
    """One optimiser step: `loss` is the flow-matching MSE averaged over the step's samples
    (all ranks, all micro-steps), `lr` the learning rate it used, `samples_per_s` the
    step's samples over its wall time (data reading, forward, backward, optimiser),
    `peak_memory_gib` the largest peak of any worker so far (GPU: allocated memory; CPU:
    the worker process's peak RSS)."""

    step: int
    expert: str
    loss: float
    lr: float
    samples_per_s: float
    grad_norm: float
    seconds: float
    samples_seen: int
    peak_memory_gib: float = 0.0


@dataclass(frozen=True)
class ValidationRow(Record):
    """The validation story rendered with the LoRA after `step` steps of `expert`, and the
    project's cross-shot consistency of that render (`evaluation.metrics.story_consistency`
    with the validation's video-text encoder)."""

    step: int
    expert: str
    story_uri: str
    consistency_all_pairs: float
    consistency_top10: float
    num_shot_pairs: int
    seconds: float
