"""The nightly render flow: every new story script rendered once, failures reported.

    list scripts -> validate -> drop committed -> batch pipeline -> publish run tables

Steps are Prefect tasks (`flows.render_stage`); storage and cluster-connection failures
are retried with exponential backoff (`flows.retry_policy`), bad input is not. One failing
story never fails the flow: the batch records it in `{out}/runs/{run_id}/errors.parquet`
and the flow ends COMPLETED, its state message and summary saying how many failed and where
the errors are. A lease lock in storage (`flows.output_lock`, `{out}/_locks/render.json`)
keeps two runs from writing one output at the same time; a second run fails at once naming
the holder (or waits up to `lock_wait_s`).

Locally (`ray_address=None`) the batch runs in this process on an embedded Ray; with
`ray_address="http://HEAD:8265"` it is submitted as a Ray job (idempotent submission id:
a retried task attaches to the job it already started) and polled.
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.output_lock import OutputLock
from flows.render_options import model_argv
from flows.render_stage import (absolute_uri, check_settings, default_run_id, render_stage,
                                run_logger)

FLOW_NAME = "storymem-nightly-render"


@flow(name=FLOW_NAME)
def nightly_render(
    source: str,
    out: str,
    ray_address: str | None = None,
    preset: str | None = None,
    model_dir: str | None = None,
    t2v_model_dir: str | None = None,
    lora_dir: str | None = None,
    render_args: list[str] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    batch_args: list[str] | None = None,
    run_id: str | None = None,
    runtime_env: dict | None = None,
    retries: int = 3,
    retry_backoff_s: float = 10.0,
    lock_ttl_s: float = 900.0,
    lock_wait_s: float = 0.0,
    job_poll_s: float = 10.0,
    job_timeout_s: float | None = None,
):
    """Render every script of `source` not yet committed in `out`; returns the summary.

    source: scripts folder/prefix, glob or manifest (local or s3://), as `storymem batch`.
    out: output folder or URI; stories go to `{out}/{story_id}/{config_hash}/`, the run's
        tables to `{out}/runs/{run_id}/` (+ `flow_summary.json`).
    ray_address: None = run in this process on an embedded Ray; `http://HEAD:8265` = submit
        a Ray job to that cluster's job server and poll it.
    preset / model_dir / t2v_model_dir / lora_dir: the model, as `storymem render` flags.
    render_args: other model/render flags, e.g. ["--transition", "mm2v", "--seed", "7"].
    workers, gpus_per_worker: story workers of the batch.
    batch_args: other `storymem batch` flags, e.g. ["--clip-actors", "2"].
    run_id: the run folder name (default: `nightly-{date}-{flow run}`).
    runtime_env: Ray runtime_env for the cluster job (env vars, ...).
    retries, retry_backoff_s: retries of storage/cluster steps, exponential backoff base.
    lock_ttl_s, lock_wait_s: the output lock's lease length and how long to wait for it.
    job_poll_s, job_timeout_s: polling of the cluster job.
    """
    source, out = absolute_uri(source), absolute_uri(out)
    argv = model_argv(preset, model_dir, t2v_model_dir, lora_dir, render_args)
    check_settings(out, argv, workers, gpus_per_worker, batch_args)
    run_id = run_id or default_run_id("nightly")
    owner = f"{FLOW_NAME} run {run_id} (flow run {flow_run.id or '-'})"
    with OutputLock(out, name="render", owner=owner, ttl_s=lock_ttl_s, wait_s=lock_wait_s):
        _, summary = render_stage(
            "nightly", source, out, run_id, argv, ray_address=ray_address, workers=workers,
            gpus_per_worker=gpus_per_worker, batch_args=batch_args, runtime_env=runtime_env,
            retries=retries, retry_backoff_s=retry_backoff_s, job_poll_s=job_poll_s,
            job_timeout_s=job_timeout_s)
    run_logger().info(summary["message"])
    return Completed(message=summary["message"], data=summary)
