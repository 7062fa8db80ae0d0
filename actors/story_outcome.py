"""What a story worker answers the driver: who it is (`WorkerInfo`) and how a story went
(`StoryOutcome`). Small frozen records, no frames."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class RunnerStatus(enum.StrEnum):
    """How the story runner found the story (`storymem_model.runner.StoryResult.status`)."""

    RENDERED = "rendered"  # from scratch
    RESUMED = "resumed"  # continued after checkpointed shots
    SKIPPED = "skipped"  # already committed


@dataclass(frozen=True)
class WorkerInfo:
    """A ready worker: its name and process, the config it renders with, its load time."""

    worker: str
    pid: int
    host: str
    config_hash: str
    load_s: float


@dataclass(frozen=True)
class Consistency:
    """Cross-shot consistency of a story (storymem_model.evaluation.metrics.story_consistency)."""

    all_pairs: float
    top10: float


@dataclass(frozen=True)
class StoryOutcome:
    """A story a worker rendered, resumed or found committed."""

    story_id: str
    config_hash: str
    story_uri: str
    video_uri: str
    status: RunnerStatus
    shots_total: int
    shots_rendered: int  # by this call
    wall_s: float
    worker: str
    consistency: Consistency | None = None
    # the cost of the shots rendered by this call (sums of their records)
    shot_seconds: float = 0.0
    denoise_seconds: float = 0.0
    model_evaluations: int = 0
