"""The Serve app's own metrics, exported with Serve's (Prometheus, through Ray's agent).

`storymem_shots_rendered` (counter) and `storymem_shot_seconds` (histogram of the wall
time of one shot: generate, select, write), both tagged with the `ShotKind`.
"""
from __future__ import annotations

import enum


class ShotKind(enum.StrEnum):
    """Which endpoint rendered a shot."""

    SINGLE = "single"  # POST /v1/shots
    SESSION = "session"  # POST /v1/sessions/{id}/shots
    STORY = "story"  # a shot of a story job


class ShotMetrics:
    """Counts and times shots, by kind (create inside a replica)."""

    def __init__(self):
        from ray.serve import metrics

        self._count = metrics.Counter(
            "storymem_shots_rendered", description="shots rendered, by kind",
            tag_keys=("kind",))
        self._seconds = metrics.Histogram(
            "storymem_shot_seconds", description="wall time of one shot (generate, select, "
            "write), by kind", boundaries=[0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
            tag_keys=("kind",))

    def shot(self, kind: ShotKind, seconds: float) -> None:
        self._count.inc(tags={"kind": kind.value})
        self._seconds.observe(float(seconds), tags={"kind": kind.value})
