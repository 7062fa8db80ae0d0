"""The end of a flow run: complete the run folder, write the flow summary, show it in Prefect.

The batch writes `{out}/runs/{run_id}/` (stories, shots, errors, summary.json). When the
flow had nothing to render it writes that folder itself with the same tables and row
types (`pipelines.run_tables`), so every scheduled run leaves a complete, comparable
record. Scripts the plan found invalid never reach the batch; they are added to the run's
`errors.parquet` (stage "listing", the planner's error type). The counts come from the
run's own tables (not from memory), then:

- `{out}/runs/{run_id}/flow_summary.json`: the plan (listed, already committed, invalid),
  the run's counts, where the tables and errors are, the cluster job id, the resolved
  render spec (model, scorers, config) and the batch options;
- Prefect artifacts: a Markdown summary and a table of the failures (first 100).
"""
from __future__ import annotations

import json
import logging
import time

from pipelines.run_tables import (ErrorRow, ErrorStage, StoryRow, StoryStatus, count_statuses,
                                  read_run_table, run_uri, table_bytes, write_run_tables,
                                  write_summary)
from storymem_model import storage

log = logging.getLogger("storymem.flows")

MAX_LISTED_ERRORS = 100


def write_tables_without_batch(plan, run_id: str, out: str) -> None:
    """Run tables for a run where the batch was not needed (nothing pending)."""
    stories = [StoryRow.skipped(run_id, story, plan.config_hash) for story in plan.committed]
    errors = [ErrorRow.listing(run_id, bad) for bad in plan.invalid]
    folder = run_uri(out, run_id)
    write_run_tables(folder, run_id, stories, errors)
    write_summary(folder, {"run_id": run_id, "out": out, "scripts": plan.source,
                           "config_hash": plan.config_hash, "listed": plan.listed,
                           "skipped": len(stories), "invalid": len(errors),
                           "written_by": "flow (no story needed rendering)",
                           "finished_at": time.time()})


def publish_run(kind: str, plan, outcome, run_id: str, extra: dict) -> dict:
    out = extra["out"]
    folder = run_uri(out, run_id)
    if outcome is None:
        write_tables_without_batch(plan, run_id, out)
    stories = [StoryRow.from_row(r)
               for r in read_run_table(storage.join(folder, "stories.parquet"))]
    errors_uri = storage.join(folder, "errors.parquet")
    errors = [ErrorRow.from_row(e) for e in read_run_table(errors_uri)]
    # Invalid scripts the flow kept out of the batch are part of this run's errors too.
    known = {(e.source, e.stage) for e in errors}
    flow_errors = [ErrorRow.listing(run_id, bad) for bad in plan.invalid
                   if (bad.source, ErrorStage.LISTING.value) not in known]
    if flow_errors:
        errors = sorted(errors + flow_errors, key=lambda r: (r.position, r.stage))
        storage.write_bytes(errors_uri, table_bytes(ErrorRow.table(errors)))
    status_counts = count_statuses(stories, errors)
    failed = status_counts[StoryStatus.FAILED.value]
    invalid = status_counts["invalid"]
    failures = failed + invalid
    summary = {
        "flow": kind, "run_id": run_id, "run_uri": folder,
        "source": extra.get("source"), "out": out,
        "config_hash": plan.config_hash,
        "listed": plan.listed,
        # Without a batch the flow's own tables list the committed stories as skipped.
        "already_committed": len(plan.committed) + (
            status_counts[StoryStatus.SKIPPED.value] if outcome is not None else 0),
        "rendered": status_counts[StoryStatus.RENDERED.value],
        "failed": failed, "invalid": invalid, "failures": failures,
        "stories_uri": storage.join(folder, "stories.parquet"),
        "shots_uri": storage.join(folder, "shots.parquet"),
        "errors_uri": errors_uri,
        "batch_ran": outcome is not None,
        "batch_mode": getattr(outcome, "mode", None),
        "ray_submission_id": getattr(outcome, "submission_id", None),
        "batch_summary": getattr(outcome, "summary", None),
        "errors": [{"source": e.source, "story_id": e.story_id, "stage": e.stage,
                    "error_type": e.error_type,
                    "message": (e.message or "").splitlines()[0][:500]}
                   for e in errors[:MAX_LISTED_ERRORS]],
        "started_at": extra.get("started_at"), "finished_at": time.time(),
        "ray_address": extra.get("ray_address"),
        "render_spec": extra.get("render_spec"), "batch_options": extra.get("batch_options"),
    }
    summary["message"] = _message(summary)
    summary["summary_uri"] = storage.join(folder, "flow_summary.json")
    storage.write_bytes(summary["summary_uri"], json.dumps(
        summary, indent=2, sort_keys=True, default=str).encode("utf-8"))
    _artifacts(kind, summary)
    return summary


def _message(summary: dict) -> str:
    text = (f"{summary['rendered']} rendered, {summary['already_committed']} already "
            f"committed, {summary['failed']} failed, {summary['invalid']} invalid "
            f"of {summary['listed']} listed")
    if summary["failures"]:
        text += f"; {summary['failures']} failure(s), errors in {summary['errors_uri']}"
    return text


def _artifacts(kind: str, summary: dict) -> None:
    """Prefect artifacts for the UI; a run outside Prefect (or without an API) skips them."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return
    key = f"storymem-{kind}-summary"
    lines = [f"## storymem {kind} run `{summary['run_id']}`", "",
             f"**{summary['message']}**", "", "| | |", "|---|---|"]
    for name in ("listed", "rendered", "already_committed", "failed", "invalid",
                 "run_uri", "errors_uri", "ray_submission_id"):
        lines.append(f"| {name} | `{summary.get(name)}` |")
    try:
        create_markdown_artifact("\n".join(lines), key=key,
                                 description=f"storymem {kind} summary")
        if summary["errors"]:
            create_table_artifact(summary["errors"], key=f"storymem-{kind}-errors",
                                  description=f"failures of run {summary['run_id']}")
    except Exception as exc:  # artifacts are a courtesy; the summary file is the record
        log.warning("could not create Prefect artifacts: %s", exc)
