"""The nightly render flow: every new story script rendered once, failures reported.

    resolve specs (config hash) -> list scripts -> validate -> drop committed
    -> batch pipeline -> publish run tables

The flow's parameters are typed specs (`ModelSpec`, `ScorerSpec`, `RenderSettings`,
`BatchOptions`): Prefect validates a deployment's JSON parameters into them before the
run starts, so a bad value fails the run at once, naming the field. Steps are Prefect
tasks (`flows.render_stage`); storage and cluster-connection failures are retried with
exponential backoff (`flows.retry_policy`), bad input is not. One failing story never
fails the flow: the batch records it in `{out}/runs/{run_id}/errors.parquet` and the flow
ends COMPLETED, its state message and summary saying how many failed and where the errors
are. A lease lock in storage (`storymem_model.output_lock`, `{out}/_locks/render.json`) keeps two
runs from writing one output at the same time; a second run fails at once naming the
holder (or waits up to `lock_wait_s`). The flow takes it before planning and hands it to
the batch it starts, whose driver holds it while it renders (`flows.render_stage`).

Locally (`ray_address=None`) the batch runs in this process on an embedded Ray; with
`ray_address="http://HEAD:8265"` it is submitted as a Ray job (`storymem batch --spec`,
idempotent submission id: a retried task attaches to the job it already started) and
polled.
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed

from storymem_model.output_lock import OutputLock
from flows.render_stage import checked_run_id, render_stage, resolve_stage_spec, run_logger
from pipelines.batch.spec import BatchOptions
from storymem_model import storage
from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

FLOW_NAME = "storymem-nightly-render"


@flow(name=FLOW_NAME)
def nightly_render(
    source: str,
    out: str,
    model: ModelSpec,
    scorers: ScorerSpec | None = None,
    render: RenderSettings = RenderSettings(),
    batch: BatchOptions = BatchOptions(),
    ray_address: str | None = None,
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
        tables to `{out}/runs/{run_id}/` (+ `flow_summary.json`, and `flow/` with the
        manifest and the `batch_spec.json` the batch ran).
    model: the video model (`ModelSpec`: `preset: tiny` or `model_dir`, `t2v_model_dir`,
        `lora_dir`, `components_dir`, `lora_strength`, `device`, `dtype`, `offload`);
        folders as the Ray workers see them, readable by this flow's process too (their
        content ids make the config hash; no weights are loaded here).
    scorers: the keyframe scorers (`ScorerSpec`: `preset: tiny` or `clip_checkpoint` plus
        `aesthetic_head` + `aesthetic_clip_checkpoint` or `hps_checkpoint` +
        `hps_base_model`, `gate_threshold`); may be null only with `render.memory` false.
    render: the render settings (`RenderSettings`: transition, seed, memory, max_memory,
        memory_sink, rope_shift, keyframe selection, `sampling` overrides, size,
        reference image URIs), as the `storymem render` flags.
    batch: how the batch runs on Ray (`BatchOptions`: workers, gpus_per_worker,
        max_attempts, story_timeout_s, `scorers` pool sizes, ...). gpus_per_worker > 0
        means the workers render on a GPU (default device cuda, dtype bfloat16).
    ray_address: None = run in this process on an embedded Ray; `http://HEAD:8265` = submit
        a Ray job to that cluster's job server and poll it.
    run_id: the run folder name (default: `nightly-{date}-{flow run}`): 1-128 letters,
        digits, '-', '_' and '.', starting with a letter or digit (checked first).
    runtime_env: Ray runtime_env for the cluster job (env vars, ...).
    retries, retry_backoff_s: retries of storage/cluster steps, exponential backoff base.
    lock_ttl_s, lock_wait_s: the output lock's lease length and how long to wait for it
        (the flow holds it, then the batch it hands it to, with the same lease length).
    job_poll_s, job_timeout_s: polling of the cluster job; a job still running after
        `job_timeout_s` is stopped (finished shots are kept; the next run resumes).
    """
    run_id = checked_run_id(run_id, "nightly")
    source, out = storage.absolute_uri(source), storage.absolute_uri(out)
    render_spec = resolve_stage_spec(model, scorers, render, batch, retries=retries,
                                     retry_backoff_s=retry_backoff_s)
    owner = f"{FLOW_NAME} run {run_id} (flow run {flow_run.id or '-'})"
    with OutputLock(out, name="render", owner=owner, ttl_s=lock_ttl_s,
                    wait_s=lock_wait_s) as lock:
        _, summary = render_stage(
            "nightly", source, out, run_id, render_spec, batch, lock=lock,
            ray_address=ray_address,
            runtime_env=runtime_env, retries=retries, retry_backoff_s=retry_backoff_s,
            job_poll_s=job_poll_s, job_timeout_s=job_timeout_s)
    run_logger().info(summary["message"])
    return Completed(message=summary["message"], data=summary)
