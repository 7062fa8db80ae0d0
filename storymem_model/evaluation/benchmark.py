"""A whole output folder evaluated: every committed story render, per-method means, files.

`evaluate_output(out_uri, encoders)` finds the committed renders (`renders`), scores each
(`story_eval.evaluate_story`; one story failing never stops the others: it gets a story row
with `error` set), averages per method (`summarize`: the Table 1 rows) and writes, under
`report_uri` (default `{out}/_eval`; story ids never start with "_"):

    eval.parquet    every row (`rows.EvalRow`: level "shot" | "story" | "benchmark")
    summary.json    the Table 1 rows, encoder names, what was not evaluated
    report.md + PNG charts (`report.write_report`)
"""
from __future__ import annotations

import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from storymem_model import storage
from storymem_model.evaluation import metrics, report
from storymem_model.evaluation.encoder_factory import Encoders
from storymem_model.evaluation.renders import EvaluationError, find_rendered_stories
from storymem_model.evaluation.rows import EvalLevel, EvalRow
from storymem_model.evaluation.story_eval import evaluate_story

log = logging.getLogger("storymem.eval")

EVAL_DIR = "_eval"
EVAL_PARQUET = "eval.parquet"
SUMMARY_JSON = "summary.json"


@dataclass(frozen=True)
class StoryEvaluated:
    """Progress event: story `done` of `total` has been scored."""

    story_id: str
    method: str
    done: int
    total: int


@dataclass
class EvaluationResult:
    shot_rows: list[EvalRow]
    story_rows: list[EvalRow]
    summary_rows: list[EvalRow]
    report_uri: str
    parquet_uri: str
    files: dict[str, str]

    @property
    def errors(self) -> list[EvalRow]:
        """The story rows of renders that could not be evaluated."""
        return [r for r in self.story_rows if r.error]


def summarize(story_rows: Sequence[EvalRow]) -> list[EvalRow]:
    """The Table 1 rows: per method, the mean over its evaluated stories (StoryMem first)."""
    by_method: dict[str, list[EvalRow]] = defaultdict(list)
    for row in story_rows:
        if not row.error:
            by_method[row.method].append(row)
    order = sorted(by_method, key=lambda m: (not m.startswith("storymem"), m))
    return [EvalRow(level=EvalLevel.BENCHMARK.value, method=method,
                    num_stories=len(by_method[method]),
                    **{c: metrics.benchmark_mean(r.metric(c) for r in by_method[method])
                       for c in metrics.TABLE1_COLUMNS})
            for method in order]


def summary_entry(row: EvalRow) -> dict:
    """A Table 1 row as summary.json holds it."""
    return {"level": row.level, "method": row.method, "num_stories": row.num_stories,
            **{c: row.metric(c) for c in metrics.TABLE1_COLUMNS}}


def evaluate_output(out_uri: str, encoders: Encoders, *, scripts: dict | None = None,
                    report_uri: str | None = None,
                    progress: Callable[[StoryEvaluated], None] | None = None
                    ) -> EvaluationResult:
    """Evaluate every committed story render under `out_uri`; write parquet and report.

    `scripts` ({story_id: StoryScript}) limits the evaluation to those stories (their
    overview is the global prompt). Raises EvaluationError when the folder is missing or
    holds no story render at all."""
    import pyarrow.parquet as pq

    report_uri = report_uri or storage.join(out_uri, EVAL_DIR)
    stories, story_rows = find_rendered_stories(out_uri, scripts)
    if not stories and not story_rows:
        raise EvaluationError(f"no story renders under {out_uri} (expected "
                              "{out}/{story_id}/{config_hash}/_COMMITTED.json)")
    shot_rows: list[EvalRow] = []
    for number, story in enumerate(stories, 1):
        try:
            shots, row = evaluate_story(story, encoders)
        except Exception as exc:  # noqa: BLE001 - one bad story never stops the others
            log.error("story %s (%s) not evaluated: %s", story.story_id, story.method, exc)
            story_rows.append(EvalRow.not_evaluated(
                story.story_id, story.config_hash, story.uri, f"{type(exc).__name__}: {exc}",
                story.method, story.story_name))
            continue
        shot_rows += shots
        story_rows.append(row)
        if progress:
            progress(StoryEvaluated(story.story_id, story.method, number, len(stories)))
    story_rows.sort(key=lambda r: (r.story_id, r.method or ""))
    summary_rows = summarize(story_rows)

    parquet_uri = storage.join(report_uri, EVAL_PARQUET)
    buffer = io.BytesIO()
    pq.write_table(EvalRow.table([*summary_rows, *story_rows, *shot_rows]), buffer)
    storage.write_bytes(parquet_uri, buffer.getvalue())
    files = {EVAL_PARQUET: parquet_uri}
    video_name, aesthetic_name = encoders.video.name, encoders.aesthetic.name
    summary = {"out_uri": out_uri, "video_encoder": video_name,
               "aesthetic_scorer": aesthetic_name,
               "aesthetic_frames": encoders.aesthetic_frames, "encoders": encoders.spec.to_dict(),
               "table1": [summary_entry(r) for r in summary_rows],
               "not_evaluated": [{"story_id": r.story_id, "config_hash": r.config_hash,
                                  "error": r.error} for r in story_rows if r.error]}
    summary_uri = storage.join(report_uri, SUMMARY_JSON)
    storage.write_bytes(summary_uri, json.dumps(_json_clean(summary), indent=1,
                                                allow_nan=False).encode("utf-8"))
    files[SUMMARY_JSON] = summary_uri
    notes = [f"video-text encoder: {video_name}; aesthetic scorer: {aesthetic_name}",
             "global prompt following uses the story overview when the script has one, "
             "else the shot prompts joined",
             "cross-shot consistency is undefined (-) for one-shot stories; benchmark means "
             "skip it"]
    if encoders.any_tiny:
        notes.append("tiny encoders have random weights: these numbers only show that the "
                     "pipeline runs, they say nothing about the videos")
    files.update(report.write_report(report_uri, shot_rows, story_rows, summary_rows,
                                     notes=notes))
    return EvaluationResult(shot_rows, story_rows, summary_rows, report_uri, parquet_uri, files)


def _json_clean(value):
    """NaN (undefined metric) -> null, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
