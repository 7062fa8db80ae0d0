"""The rows of an evaluation: one typed record for `eval.parquet`, its schema derived.

`eval.parquet` holds three levels of rows in one table (column `level`):

* "shot": one per evaluated shot (scene, shot, shot_index, prompt, num_frames,
  aesthetic_quality, prompt_following_single_shot, consistency_to_others);
* "story": one per story render (num_shots, num_frames, all five Table 1 metrics,
  num_shot_pairs, the shot-by-shot consistency_matrix flattened row by row,
  global_text_source), or one with `error` set when the render could not be evaluated;
* "benchmark": one per method (num_stories and the five Table 1 metrics: means over its
  evaluated stories).

Fields a level does not use stay None (null in Parquet). A metric that is undefined (the
consistency of a one-shot story) is NaN.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from storymem_model.records import Record, arrow_field


class EvalLevel(enum.StrEnum):
    SHOT = "shot"
    STORY = "story"
    BENCHMARK = "benchmark"


@dataclass
class EvalRow(Record):
    """One row of eval.parquet (see the module docstring for which level fills what)."""

    level: str  # an EvalLevel value
    method: str | None = None
    config_hash: str | None = None
    story_id: str | None = None
    story_name: str | None = None
    scene: int | None = arrow_field("int32", default=None)
    shot: int | None = arrow_field("int32", default=None)
    shot_index: int | None = arrow_field("int32", default=None)
    prompt: str | None = None
    num_shots: int | None = arrow_field("int32", default=None)
    num_frames: int | None = arrow_field("int32", default=None)
    num_stories: int | None = arrow_field("int32", default=None)
    aesthetic_quality: float | None = None
    prompt_following_global: float | None = None
    prompt_following_single_shot: float | None = None
    consistency_all_pairs: float | None = None
    consistency_top10: float | None = None
    consistency_to_others: float | None = None
    num_shot_pairs: int | None = arrow_field("int32", default=None)
    consistency_matrix: list | None = arrow_field("list<float64>", default=None)
    global_text_source: str | None = None  # "overview" or "prompts"
    video_encoder: str | None = None
    aesthetic_scorer: str | None = None
    story_uri: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self.level = EvalLevel(self.level).value  # refuses an unknown level

    @classmethod
    def not_evaluated(cls, story_id: str, config_hash: str, story_uri: str, error: str,
                      method: str = "", story_name: str = "") -> "EvalRow":
        """The story row of a render that could not be evaluated."""
        return cls(level=EvalLevel.STORY.value, story_id=story_id, config_hash=config_hash,
                   story_uri=story_uri, method=method, story_name=story_name, error=error)

    def metric(self, column: str) -> float | None:
        """A Table 1 column's value by name."""
        return getattr(self, column)

    def matrix(self):
        """The story's shot-by-shot consistency as a (num_shots, num_shots) array."""
        import numpy as np

        return np.asarray(self.consistency_matrix, dtype=np.float64).reshape(
            self.num_shots, self.num_shots)
