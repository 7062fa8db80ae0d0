"""The render part both flows share: plan -> batch -> published run tables.

    config hash -> plan (list, validate, drop committed) -> manifest -> batch -> publish

Each step is a Prefect task with the run's retry options (`flows.retry_policy`). The
caller holds the output lock (`flows.output_lock`) around the whole stage.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import batch_launch, ray_job
from flows.publish_run import publish_run
from flows.retry_policy import retry_options
from flows.story_plan import StoryPlan, plan_stories, write_manifest
from storymem_model import storage


def run_logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (unit use)
        return logging.getLogger("storymem.flows")


def default_run_id(prefix: str) -> str:
    """`{prefix}-20261125-010000-1a2b3c4d`: the date and the flow run, stable across retries."""
    started = flow_run.scheduled_start_time
    stamp = (started or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    run = str(flow_run.id or "")[:8] or os.urandom(4).hex()
    return f"{prefix}-{stamp}-{run}"


def absolute_uri(uri: str) -> str:
    """Local paths become absolute (the manifest and the Ray job need them so)."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"expected a path or URI, got {uri!r}")
    return uri if "://" in uri else os.path.abspath(uri)


# -- tasks -------------------------------------------------------------------------------
@task(name="config-hash", cache_policy=NO_CACHE)
def resolve_config_hash(argv: list[str], same_machine: bool) -> str | None:
    from flows.config_identity import config_hash_for_argv

    return config_hash_for_argv(argv, same_machine=same_machine)


@task(name="plan-stories", cache_policy=NO_CACHE)
def plan_task(source: str, out: str, config_hash: str | None) -> StoryPlan:
    plan = plan_stories(source, out, config_hash)
    log = run_logger()
    log.info("listed %d scripts: %d to render, %d already committed, %d invalid",
             plan.listed, len(plan.pending), len(plan.committed), len(plan.invalid))
    for bad in plan.invalid:
        log.warning("invalid script %s: %s", bad.source, bad.message.splitlines()[0])
    return plan


@task(name="write-manifest", cache_policy=NO_CACHE)
def manifest_task(plan: StoryPlan, uri: str) -> str:
    return write_manifest(plan.pending, uri)


@task(name="run-batch", cache_policy=NO_CACHE)
def batch_task(request: batch_launch.BatchRequest, ray_address: str | None,
               submission_id: str, runtime_env: dict | None, poll_s: float,
               timeout_s: float | None) -> batch_launch.BatchOutcome:
    if ray_address:
        return batch_launch.run_on_cluster(request, ray_address, submission_id,
                                           runtime_env=runtime_env, poll_s=poll_s,
                                           timeout_s=timeout_s)
    return batch_launch.run_local(request)


@task(name="publish-run", cache_policy=NO_CACHE)
def publish_task(kind: str, plan: StoryPlan, outcome, run_id: str, extra: dict) -> dict:
    return publish_run(kind, plan, outcome, run_id, extra)


# -- the stage -------------------------------------------------------------------------------
def check_settings(out: str, argv: list[str], workers: int, gpus_per_worker: float,
                   batch_args: list[str] | None) -> None:
    """Bad settings fail before any work, with the `storymem batch` parser's message."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    batch_launch.BatchRequest("<scripts>", out, "check", argv, workers, gpus_per_worker,
                              list(batch_args or [])).parse()


def render_stage(kind: str, source: str, out: str, run_id: str, argv: list[str], *,
                 ray_address: str | None, workers: int, gpus_per_worker: float,
                 batch_args: list[str] | None, runtime_env: dict | None, retries: int,
                 retry_backoff_s: float, job_poll_s: float,
                 job_timeout_s: float | None) -> tuple[StoryPlan, dict]:
    """Render what is not committed yet; returns (plan, published run summary)."""
    started = time.time()
    opts = retry_options(retries, retry_backoff_s)
    config_hash = resolve_config_hash.with_options(**opts)(argv, not ray_address)
    plan = plan_task.with_options(**opts)(source, out, config_hash)
    outcome = None
    submission_id = None
    if plan.pending:
        run_folder = storage.join(out, "runs", run_id)
        manifest = manifest_task.with_options(**opts)(
            plan, storage.join(run_folder, "flow", "manifest.jsonl"))
        request = batch_launch.BatchRequest(
            scripts=manifest, out=out, run_id=run_id, model_argv=argv, workers=workers,
            gpus_per_worker=gpus_per_worker, batch_args=list(batch_args or []))
        submission_id = ray_job.submission_id_for(
            kind, out, run_id, attempt=int(flow_run.run_count or 1))
        # A local batch is not retried as a whole: it retries stories itself. A cluster
        # job is: a retry attaches to the job the first attempt submitted.
        batch_opts = opts if ray_address else retry_options(0, 0)
        outcome = batch_task.with_options(**batch_opts)(
            request, ray_address, submission_id, runtime_env, job_poll_s, job_timeout_s)
    else:
        run_logger().info("nothing to render: every valid script is already committed")
    summary = publish_task.with_options(**opts)(
        kind, plan, outcome, run_id,
        {"source": source, "out": out, "ray_address": ray_address,
         "model_argv": argv, "batch_args": list(batch_args or []),
         "started_at": started})
    return plan, summary
