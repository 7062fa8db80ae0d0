"""The training flow: clips -> a validated StoryMem LoRA pair, published.

    prepare (Ray Data) -> fit (Ray Train) -> validate (render + consistency) -> publish

Parameters are typed specs (`PrepareSpec`, `FitSpec`): Prefect validates a deployment's
JSON parameters into them before the run starts. Every step is a task; storage and
cluster-connection failures are retried with exponential backoff (`flows.retry_policy`),
bad input is not. Each step is idempotent: a finished preparation is not redone (its
commit marker), a fit continues from its last Ray Train checkpoint or returns its finished
card, a validation render already committed is reused, publishing rewrites the same keys.
A lease lock (`{fit.out}/_locks/train.json`) keeps two runs off one output.

validate: the validation story of `fit.validation` rendered with the new LoRA
(`training.validation.validate_lora`, in this flow's process: on a GPU machine for real
models), its cross-shot consistency written to `{fit.out}/validation_final.json`; skipped
(and said so) without a validation spec.
publish: `lora/backbone_{high,low}_noise.safetensors`, `training_card.json` and
`validation_final.json` copied to `publish_to`, with a `_COMMITTED.json` listing them
(written last, with the LoRA files' sha256).
"""
from __future__ import annotations

import json

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from storymem_model.output_lock import OutputLock
from flows.render_stage import run_logger
from flows.retry_policy import retry_options
from storymem_model import storage
from storymem_model.training.specs import FitSpec, PrepareSpec

FLOW_NAME = "storymem-train-lora"
VALIDATION_FILE = "validation_final.json"


@task(name="prepare-clips", cache_policy=NO_CACHE)
def prepare_task(spec: PrepareSpec) -> dict:
    from pipelines.training.prepare import run_prepare

    result = run_prepare(spec)
    run_logger().info(result.message)
    return {"message": result.message, "clips": result.clips, "errors": result.errors,
            "groups": result.groups, "shards": result.shards, "skipped": result.skipped}


@task(name="fit-lora", cache_policy=NO_CACHE)
def fit_task(spec: FitSpec, lock: OutputLock | None = None) -> dict:
    """Fit and publish into `spec.out`; with `lock` (the held lock of `spec.out`), the fit
    stops at its next checkpoint once the lock was taken over and publishes nothing."""
    from pipelines.training.fit import run_fit

    result = run_fit(spec, lease=lock.ticket() if lock is not None else None)
    run_logger().info(result.message)
    return {"message": result.message, "lora_dir": result.lora_dir, "card": result.card}


@task(name="validate-lora", cache_policy=NO_CACHE)
def validate_task(spec: FitSpec) -> dict | None:
    """Render the validation story with the fitted LoRA (a local copy of the pair)."""
    import tempfile

    from storymem_model.training.lora import EXPERT_FILES
    from storymem_model.training.validation import validate_lora

    if spec.validation is None:
        run_logger().info("no validation spec: the LoRA is published unvalidated")
        return None
    import torch

    model = spec.model.resolved(accelerator=torch.cuda.is_available())
    with tempfile.TemporaryDirectory(prefix="storymem-lora-") as folder:
        for name in EXPERT_FILES.values():
            data = storage.read_bytes(storage.join(spec.out, "lora", name))
            with open(f"{folder}/{name}", "wb") as handle:
                handle.write(data)
        row = validate_lora(spec.validation, model, folder, storage.join(spec.out, "validation", "final"),
                            step=spec.steps, expert=spec.expert)
    numbers = row.to_row()
    storage.write_bytes(storage.join(spec.out, VALIDATION_FILE), json.dumps(numbers, indent=2).encode())
    run_logger().info("validation: consistency %.4f (all pairs), %.4f (top 10) on %s",
                      row.consistency_all_pairs, row.consistency_top10, row.story_uri)
    return numbers


@task(name="publish-lora", cache_policy=NO_CACHE)
def publish_task(spec: FitSpec, publish_to: str) -> dict:
    from storymem_model.training.lora import EXPERT_FILES

    files = [f"lora/{name}" for name in EXPERT_FILES.values()] + ["training_card.json"]
    if storage.exists(storage.join(spec.out, VALIDATION_FILE)):
        files.append(VALIDATION_FILE)
    storage.remove(storage.join(publish_to, storage.COMMIT_MARKER))
    for rel in files:
        storage.write_bytes(storage.join(publish_to, rel), storage.read_bytes(storage.join(spec.out, rel)))
    marker = storage.write_commit_marker(publish_to, files, {"source": spec.out, "what": "storymem-lora"})
    return {"publish_to": publish_to, "files": marker["files"]}


def _absolute(prepare: PrepareSpec, fit: FitSpec) -> tuple[PrepareSpec, FitSpec]:
    prepare = prepare.replace(clips=storage.absolute_uri(prepare.clips), out=storage.absolute_uri(prepare.out))
    fit = fit.replace(data=storage.absolute_uri(fit.data), out=storage.absolute_uri(fit.out),
                      checkpoints=None if fit.checkpoints is None else storage.absolute_uri(fit.checkpoints))
    return prepare, fit


@flow(name=FLOW_NAME)
def train_lora(prepare: PrepareSpec, fit: FitSpec, publish_to: str | None = None, retries: int = 3,
               retry_backoff_s: float = 10.0, lock_ttl_s: float = 900.0, lock_wait_s: float = 0.0):
    """Prepare `prepare.clips` into `prepare.out`, fit the LoRA on it into `fit.out`, validate
    it with `fit.validation` and publish it to `publish_to` (skipped when None).

    prepare: the preparation (`PrepareSpec`: clips manifest or dataset folder, out, model,
        scorers, training geometry, grouping, Ray Data workers).
    fit: the fit (`FitSpec`); `fit.data` must be `prepare.out`; `fit.validation` names the
        validation story (optional).
    retries, retry_backoff_s: retries of transient failures per step, backoff base.
    lock_ttl_s, lock_wait_s: the output lock's lease and how long to wait for it.
    """
    prepare, fit = _absolute(prepare, fit)
    if fit.data.rstrip("/") != prepare.out.rstrip("/"):
        raise ValueError(f"fit.data ({fit.data}) must be prepare.out ({prepare.out}): the fit trains on "
                         "what this flow prepares")
    options = retry_options(retries, retry_backoff_s)
    owner = f"{FLOW_NAME} (flow run {flow_run.id or '-'})"
    with OutputLock(fit.out, name="train", owner=owner, ttl_s=lock_ttl_s, wait_s=lock_wait_s) as lock:
        # Each step starts only after the lock is renewed: a run whose lock was taken over
        # (LeaseLostError) fits, validates or publishes nothing more.
        prepared = prepare_task.with_options(**options)(prepare)
        lock.renew()
        fitted = fit_task.with_options(**options)(fit, lock=lock)
        lock.renew()
        validation = validate_task.with_options(**options)(fit)
        lock.renew()
        published = publish_task.with_options(**options)(fit, storage.absolute_uri(publish_to)) if publish_to else None
    message = f"{prepared['message']}; {fitted['message']}"
    if validation is not None:
        message += (f"; validation consistency {validation['consistency_all_pairs']:.4f} (all pairs), "
                    f"{validation['consistency_top10']:.4f} (top 10)")
    if published is not None:
        message += f"; published to {published['publish_to']}"
    summary = {"flow": "train_lora", "message": message, "prepare": prepared, "fit": fitted,
               "validation": validation, "published": published, "lora_dir": fitted["lora_dir"]}
    run_logger().info(message)
    return Completed(message=message, data=summary)
