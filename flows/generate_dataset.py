"""The dataset flow: render stories through the batch pipeline, then write a training set.

    render stage (as the nightly flow) -> committed stories -> dataset (one row per shot)

Renders go to `render_out` (default `{out}/renders`), the dataset to `{out}`:
`data/split=.../{story_id}.parquet`, `dataset_card.json` and `_COMMITTED.json`
(`pipelines.dataset_writer`). Stories already committed under `render_out` are not
rendered again, so pointing `render_out` at a nightly output turns its renders into a
dataset without any GPU work. Stories that failed are left out and counted in the card;
the flow's state message says how many. Keyframes and prompts are embedded in the flow's
own process by the CLIP the `scorers` spec names (`scorers.factory.build_embedder`), on
this machine's GPU when it has one, else on its CPU; keyframes are prepared as keyframe
selection prepared them (the config's `keyframe_preprocess`), so their embeddings are the
memory bank's.
"""
from __future__ import annotations

import json

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from storymem_model.output_lock import OutputLock
from flows.render_stage import checked_run_id, render_stage, resolve_stage_spec, run_logger
from flows.retry_policy import retry_options
from pipelines.batch.spec import BatchOptions
from pipelines.run_tables import read_run_table
from storymem_model import output_layout, storage
from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

FLOW_NAME = "storymem-generate-dataset"
MAX_CONFIG_BYTES = 1024 * 1024  # a story's config.json is read with this limit


def committed_story_uris(plan, run_summary: dict) -> list[str]:
    """Story folders of this source that are committed: from the plan and the run table."""
    uris = [s.story_uri for s in plan.committed]
    rows = read_run_table(run_summary["stories_uri"])
    uris += [r["story_uri"] for r in rows
             if r.get("status") in ("rendered", "skipped") and r.get("story_uri")]
    return sorted({u for u in uris if storage.is_committed(u)})


@task(name="write-dataset", cache_policy=NO_CACHE)
def dataset_task(story_uris: list[str], out: str, scorers: ScorerSpec, render_spec: dict,
                 validation_percent: float, card_extra: dict,
                 lock: OutputLock | None = None) -> dict:
    """Write the dataset; with `lock` (the held lock of `out`), every write first renews
    it, so a run whose lock was taken over stops (LeaseLostError) before writing more."""
    import torch

    from pipelines.dataset_writer import write_dataset
    from storymem_model.scorers.base import FrameEmbedder
    from storymem_model.scorers.factory import build_embedder

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    # The embedder runs here, on this machine's GPU if it has one, not on a worker's, and
    # sees keyframes as keyframe selection saw them (the memory bank's embeddings).
    embedder = FrameEmbedder(
        build_embedder(scorers.replace(device="cuda" if torch.cuda.is_available() else "cpu")),
        render_spec["config"]["keyframe_preprocess"])
    config = {}
    if story_uris:
        config = json.loads(storage.read_bytes(
            storage.join(story_uris[0], output_layout.CONFIG_FILE), max_bytes=MAX_CONFIG_BYTES))
    result = write_dataset(story_uris, out, embedder, validation_percent=validation_percent,
                           config={"render_config": config, "render_spec": render_spec},
                           source=card_extra,
                           before_write=lock.renew if lock is not None else None)
    return result.card


@flow(name=FLOW_NAME)
def generate_dataset(
    source: str,
    out: str,
    model: ModelSpec,
    scorers: ScorerSpec,
    render: RenderSettings = RenderSettings(),
    batch: BatchOptions = BatchOptions(),
    render_out: str | None = None,
    ray_address: str | None = None,
    validation_percent: float = 10.0,
    dataset_name: str | None = None,
    run_id: str | None = None,
    runtime_env: dict | None = None,
    retries: int = 3,
    retry_backoff_s: float = 10.0,
    lock_ttl_s: float = 900.0,
    lock_wait_s: float = 0.0,
    job_poll_s: float = 10.0,
    job_timeout_s: float | None = None,
):
    """Render the scripts of `source` and write a shot-level training dataset to `out`.

    scorers: required here: its CLIP embeds the keyframes and prompts of the dataset (and,
        with `render.memory` true, the render selects keyframes with it and its gate).
    render_out: where the stories are rendered (default `{out}/renders`); committed stories
        there are reused.
    validation_percent: share of stories (by a hash of the story id) in split=validation.
    dataset_name: the card's name (default "storymem-shots").
    The other parameters are those of `nightly_render` (the render lock of `render_out` is
    handed to the batch as there; the dataset folder has its own lock, `dataset`).
    """
    run_id = checked_run_id(run_id, "dataset")
    source, out = storage.absolute_uri(source), storage.absolute_uri(out)
    render_out = storage.absolute_uri(render_out) if render_out else storage.join(out, "renders")
    if not 0 <= validation_percent <= 100:
        raise ValueError(f"validation_percent must be within 0..100, got {validation_percent}")
    render_spec = resolve_stage_spec(model, scorers, render, batch, retries=retries,
                                     retry_backoff_s=retry_backoff_s)
    owner = f"{FLOW_NAME} run {run_id} (flow run {flow_run.id or '-'})"
    opts = retry_options(retries, retry_backoff_s)
    with OutputLock(render_out, name="render", owner=owner, ttl_s=lock_ttl_s,
                    wait_s=lock_wait_s) as lock:
        plan, run_summary = render_stage(
            "dataset", source, render_out, run_id, render_spec, batch, lock=lock,
            ray_address=ray_address, runtime_env=runtime_env, retries=retries,
            retry_backoff_s=retry_backoff_s, job_poll_s=job_poll_s,
            job_timeout_s=job_timeout_s)
        story_uris = committed_story_uris(plan, run_summary)
    with OutputLock(out, name="dataset", owner=owner, ttl_s=lock_ttl_s,
                    wait_s=lock_wait_s) as dataset_lock:
        card = dataset_task.with_options(**opts)(
            story_uris, out, scorers, render_spec.to_dict(), validation_percent,
            {"name": dataset_name, "scripts": source, "renders": render_out,
             "run_id": run_id, "run_uri": run_summary["run_uri"],
             "failures": run_summary["failures"], "errors_uri": run_summary["errors_uri"],
             "batch_options": batch.to_dict()}, lock=dataset_lock)
    summary = {
        "flow": "dataset", "run_id": run_id, "out": out, "render_out": render_out,
        "dataset_card_uri": storage.join(out, "dataset_card.json"),
        "stories": card["counts"]["stories"], "shots": card["counts"]["shots"],
        "keyframes": card["counts"]["keyframes"], "failures": run_summary["failures"],
        "errors_uri": run_summary["errors_uri"], "render_run": run_summary,
    }
    message = (f"dataset of {summary['shots']} shots from {summary['stories']} stories "
               f"({summary['keyframes']} keyframes) at {out}")
    if summary["failures"]:
        message += (f"; {summary['failures']} script(s)/story(ies) failed and are left out, "
                    f"errors in {summary['errors_uri']}")
    summary["message"] = message
    run_logger().info(message)
    return Completed(message=message, data=summary)
