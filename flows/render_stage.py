"""The render part both flows share: resolve -> plan -> batch -> published run tables.

    ModelSpec + ScorerSpec + RenderSettings --resolve--> RenderSpec (config hash)
    source --plan (list, validate, drop committed)--> manifest of pending stories
    BatchSpec(manifest, out, RenderSpec, BatchOptions) --> batch here or as a Ray job
    --> publish (run tables, flow_summary.json, Prefect artifacts)

The render spec is resolved for the hosts that render: the batch's story workers, with a
GPU each when `BatchOptions.gpus_per_worker > 0` (that decides the default device and
dtype, hence the hash). Resolving reads model config files, safetensors headers, LoRA and
scorer files for their content ids and the reference images, and loads no weights: the
flow's process needs read access to the model folders (on a cluster: the workers' paths,
mounted read-only where the flow runs too). With the hash known, committed stories are
dropped here, locally and on a cluster alike, so the batch only sees work.

Each step is a Prefect task with the run's retry options (`flows.retry_policy`).

The output lock: the caller takes `OutputLock(out, "render")` before the stage (so a
second run is refused before it plans anything) and passes it in. When stories are
pending, the stage hands the lease over to the batch right before starting it: the
BatchSpec carries the lease's token and TTL (the lock's settings are the caller's alone;
`BatchOptions` has none) and the batch driver - here in this process, or the
Ray job's driver on the cluster - takes the lease with it and holds it for as long as it
runs. There is never a second lock to deadlock on, and a flow that stops waiting for its
Ray job (or dies) does not leave the output unguarded while the job runs. After the batch
the caller's `release()` removes the lease only if the batch never took it.
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
from storymem_model.output_lock import OutputLock
from pipelines.batch.spec import BatchOptions, BatchSpec, run_id_problem
from pipelines.run_tables import run_uri
from pipelines.story_planner import StoryPlan
from storymem_model import storage
from storymem_model.render_spec import RenderSpec, resolve_render_spec
from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

# Inside a Ray job the batch driver joins the job's own cluster.
JOB_RAY_ADDRESS = "auto"


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


def checked_run_id(run_id: str | None, prefix: str) -> str:
    """The run id given (validated: the whole id must match the BatchSpec rule) or a new
    one; ValueError naming a bad one before anything is written."""
    run_id = run_id if run_id is not None else default_run_id(prefix)
    problem = run_id_problem(run_id)
    if problem:
        raise ValueError(problem)
    return run_id


def spec_uri(out: str, run_id: str) -> str:
    """Where a run's BatchSpec is written (the cluster job reads it from there)."""
    return storage.join(run_uri(out, run_id), "flow", "batch_spec.json")


# -- tasks -------------------------------------------------------------------------------
@task(name="resolve-render-spec", cache_policy=NO_CACHE)
def resolve_task(model: ModelSpec, scorers: ScorerSpec | None, render: RenderSettings,
                 batch: BatchOptions) -> RenderSpec:
    spec = resolve_render_spec(model, scorers, render,
                               accelerator=batch.gpus_per_worker > 0)
    run_logger().info("config %s: model %s on %s (%s)", spec.config_hash,
                      spec.config.model_id, spec.model.device, spec.model.dtype)
    return spec


@task(name="plan-stories", cache_policy=NO_CACHE)
def plan_task(source: str, out: str, config_hash: str) -> StoryPlan:
    plan = StoryPlan.build(source, out, config_hash)
    log = run_logger()
    log.info("listed %d scripts: %d to render, %d already committed, %d invalid",
             plan.listed, len(plan.pending), len(plan.committed), len(plan.invalid))
    for bad in plan.invalid:
        log.warning("invalid script %s: %s: %s", bad.source, bad.error_type,
                    bad.message.splitlines()[0] if bad.message else "")
    return plan


@task(name="write-manifest", cache_policy=NO_CACHE)
def manifest_task(plan: StoryPlan, uri: str) -> str:
    storage.write_bytes(uri, plan.manifest_bytes())
    return uri


@task(name="write-batch-spec", cache_policy=NO_CACHE)
def batch_spec_task(spec: BatchSpec, uri: str) -> str:
    storage.write_bytes(uri, spec.to_json(indent=1).encode("utf-8"))
    return uri


@task(name="run-batch", cache_policy=NO_CACHE)
def batch_task(spec: BatchSpec, uri: str, ray_address: str | None, submission_id: str,
               runtime_env: dict | None, poll_s: float,
               timeout_s: float | None) -> batch_launch.BatchOutcome:
    if ray_address:
        return batch_launch.run_on_cluster(spec, uri, ray_address, submission_id,
                                           runtime_env=runtime_env, poll_s=poll_s,
                                           timeout_s=timeout_s)
    return batch_launch.run_local(spec)


@task(name="publish-run", cache_policy=NO_CACHE)
def publish_task(kind: str, plan: StoryPlan, outcome, run_id: str, extra: dict) -> dict:
    return publish_run(kind, plan, outcome, run_id, extra)


# -- the stage -------------------------------------------------------------------------------
def resolve_stage_spec(model: ModelSpec, scorers: ScorerSpec | None,
                       render: RenderSettings, batch: BatchOptions, *, retries: int,
                       retry_backoff_s: float) -> RenderSpec:
    """The RenderSpec of the run (a Prefect task: reference images may live on S3)."""
    return resolve_task.with_options(**retry_options(retries, retry_backoff_s))(
        model, scorers, render, batch)


def render_stage(kind: str, source: str, out: str, run_id: str, render_spec: RenderSpec,
                 options: BatchOptions, *, lock: OutputLock, ray_address: str | None,
                 runtime_env: dict | None, retries: int, retry_backoff_s: float,
                 job_poll_s: float, job_timeout_s: float | None) -> tuple[StoryPlan, dict]:
    """Render what is not committed yet; returns (plan, published run summary). `lock` is
    the held output lock of `out`; it is handed to the batch when one runs."""
    started = time.time()
    opts = retry_options(retries, retry_backoff_s)
    plan = plan_task.with_options(**opts)(source, out, render_spec.config_hash)
    outcome = None
    if plan.pending:
        manifest = manifest_task.with_options(**opts)(
            plan, storage.join(run_uri(out, run_id), "flow", "manifest.jsonl"))
        spec = BatchSpec(scripts=manifest, out=out, render=render_spec, options=options,
                         run_id=run_id, ray_address=JOB_RAY_ADDRESS if ray_address else None,
                         lock_ttl_s=lock.ttl_s, lock_wait_s=lock.wait_s, lock_token=lock.token)
        uri = batch_spec_task.with_options(**opts)(spec, spec_uri(out, run_id))
        submission_id = ray_job.submission_id_for(
            kind, out, run_id, attempt=int(flow_run.run_count or 1))
        # A local batch is not retried as a whole: it retries stories itself. A cluster
        # job is: a retry attaches to the job the first attempt submitted.
        batch_opts = opts if ray_address else retry_options(0, 0)
        lock.hand_over()  # the batch driver takes the lease by its token from here on
        outcome = batch_task.with_options(**batch_opts)(
            spec, uri, ray_address, submission_id, runtime_env, job_poll_s, job_timeout_s)
    else:
        run_logger().info("nothing to render: every valid script is already committed")
    summary = publish_task.with_options(**opts)(
        kind, plan, outcome, run_id,
        {"source": source, "out": out, "ray_address": ray_address,
         "render_spec": render_spec.to_dict(), "batch_options": options.to_dict(),
         "started_at": started})
    return plan, summary
