"""The Ray batch: `run_batch(BatchSpec) -> BatchSummary` (see `pipelines.batch.driver`).

Pieces, one job each: `spec` (what to run), `driver` (composes the rest), `story_feed`
(the next story: retries, then the script planner's items), `worker_pool` and `slots`
(the supervised story worker actors), `recorder` (rows on storage as the run goes),
`progress` and `worker_logs` (what a person sees), `summary` (the result).
"""
from __future__ import annotations

from typing import Any

from pipelines.batch.spec import BatchOptions, BatchSpec, ScorerPoolOptions, new_run_id

_LAZY = {
    "run_batch": "pipelines.batch.driver",
    "BatchError": "pipelines.batch.driver",
    "OutputLockLost": "pipelines.batch.driver",
    "BatchSummary": "pipelines.batch.summary",
}

__all__ = ["BatchOptions", "BatchSpec", "ScorerPoolOptions", "new_run_id", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
