"""`BatchSummary`: what `run_batch` returns and writes as `{run}/summary.json`.

Counts come from the run's recorded rows (every invocation of the run id, see
`recorder`); times, rates and worker counters from this invocation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SummaryTables:
    stories: str
    shots: str
    errors: str
    logs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BatchSummary:
    run_id: str
    status: str  # "completed", or "completed_with_failures" when any story or script failed
    scripts: str
    out: str
    run_uri: str
    config_hash: str
    config: dict
    started_at: str  # ISO 8601, UTC
    finished_at: str
    wall_s: float
    startup_s: float  # start -> first worker ready
    render_wall_s: float  # first worker ready -> last story done
    listed: int  # items the listing gave
    rendered: int
    skipped: int
    failed: int  # failed_render + invalid
    failed_render: int
    invalid: int
    shots_rendered: int  # by the run's stories (every invocation of the run id)
    shots_in_run_tables: int  # rows of the run's shots.parquet
    shots_per_hour: float  # shots rendered by this invocation per hour of its wall time
    workers: int
    gpus_per_worker: float
    gpu_hours: float  # workers x GPUs per worker x wall
    busy_gpu_hours: float  # GPUs per worker x time workers spent on stories
    worker_deaths: int
    worker_replacements: int
    story_retries: int
    recorded_before: int  # rows an earlier, interrupted invocation of the run recorded
    scorers: dict[str, Any]  # batching counters per scorer pool ({} without memory)
    scorer_calls_per_shot: float
    scorer_mean_batch_requests: float
    tables: SummaryTables
    summary_uri: str = ""
    scorer_replacements: int = 0  # scorer actors replaced after dying past their restarts
    # what a shot and a story cost, over the stories this run rendered (StoryRow costs):
    # GPU-seconds = GPUs per worker x the shots' wall time (0 on CPU workers)
    gpu_seconds_per_shot: float = 0.0
    gpu_seconds_per_story: float = 0.0
    denoise_seconds_per_shot: float = 0.0
    model_evaluations_per_shot: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def shot_costs(stories) -> dict[str, float]:
    """The summary's cost fields from the run's story rows (rendered by this run)."""
    costed = [r for r in stories if r.gpu_seconds is not None and r.shots_rendered]
    shots = sum(r.shots_rendered for r in costed)
    if not costed or not shots:
        return {}
    return {"gpu_seconds_per_shot": sum(r.gpu_seconds for r in costed) / shots,
            "gpu_seconds_per_story": sum(r.gpu_seconds for r in costed) / len(costed),
            "denoise_seconds_per_shot": sum(r.denoise_seconds or 0.0 for r in costed) / shots,
            "model_evaluations_per_shot": sum(r.model_evaluations or 0 for r in costed) / shots}


def scorer_request_counts(scorers: dict) -> tuple[int, int]:
    """(requests, batches) over every method of every pool."""
    methods = [m for pool in scorers.values() for m in (pool.get("methods") or {}).values()]
    return sum(m["requests"] for m in methods), sum(m["batches"] for m in methods)
