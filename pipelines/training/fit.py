"""`storymem train fit` on Ray Train: prepared data -> a StoryMem LoRA pair (docs/training.md#training).

    run_fit(spec: FitSpec) -> FitResult

The driver checks the prepared data against the model, then runs one `TorchTrainer`
(gloo on CPU workers, NCCL on GPU workers) whose workers call `train_loop`: for each expert
of the spec (high, then low for `both`) an `ExpertTrainer` (FSDP2 or DDP), `steps`
optimiser steps on samples drawn in the seeded data order (`data_order`), a Ray Train
checkpoint every `checkpoint_every` steps and at the end of each expert. A checkpoint
holds the LoRA and optimiser state, the scheduler, the step and the data position
(`samples_seen`), the finished experts' LoRA files and the metric and validation rows so far.

Resume: Ray Train restarts failed workers from the latest checkpoint (`max_failures`
times); after a killed driver the same command finds the run by its name (a content id of
the settings that shape the result) under
the checkpoint storage and continues from its latest checkpoint. Either way the data
position and every draw are restored, so the result equals an uninterrupted run (on the
CPU bit for bit; with the same number of workers, as the samples a step averages depend on
it).

At the end the driver writes `{out}/lora/backbone_{high,low}_noise.safetensors` (released
key format; an expert not trained here and not already in `{out}/lora` gets a zero LoRA,
which changes nothing), `{out}/metrics.parquet`, `{out}/validation.parquet` (with
`--validate-every`) and `{out}/training_card.json` last.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.run_tables import table_bytes
from storymem_model import storage
from storymem_model.leases import LeaseTicket
from storymem_model.training import lora as lora_files
from storymem_model.training.records import MetricRow, ValidationRow
from storymem_model.training.specs import FitSpec
from storymem_model.training.worker_loop import METRICS_FILE, STATE_FILE, VALIDATION_FILE

log = logging.getLogger("storymem.train")

CARD_FILE = "training_card.json"
LORA_DIR = "lora"
# Fields that do not change the trained weights: a run with other values of these is the
# same run (it continues it), e.g. more workers, another cluster, another output folder.
RUN_INDEPENDENT_FIELDS = ("out", "workers", "cpus_per_worker", "gpus_per_worker",
                          "checkpoint_every", "keep_checkpoints", "checkpoints", "max_failures",
                          "validate_every", "validation", "ray_address")


class FitError(RuntimeError):
    """A fit that failed (names the reason)."""


class FitInputError(FitError):
    """A fit that cannot start: its data or model is unusable (names the problem)."""


@dataclass
class FitResult:
    out: str
    lora_dir: str
    card: dict
    skipped: bool = False
    metrics: list[dict] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.skipped:
            return f"nothing to do: {self.out} already holds this LoRA ({self.lora_dir})"
        steps = self.card.get("steps", {})
        return f"trained {', '.join(f'{e}: {n} steps' for e, n in steps.items())}; LoRA pair in {self.lora_dir}"


def run_name(spec: FitSpec) -> str:
    values = {k: v for k, v in spec.to_dict().items() if k not in RUN_INDEPENDENT_FIELDS}
    values["model"] = {k: v for k, v in values["model"].items() if k not in ("device",)}
    return "fit-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def spec_digest(spec: FitSpec) -> str:
    return hashlib.sha256(spec.to_json().encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------
# Driver

def check_data(spec: FitSpec) -> dict:
    """The prepared data's manifest, checked against the model (the latents and caption
    embeddings must come from the model whose experts are trained)."""
    from storymem_model.model_identity import model_identity
    from storymem_model.training.prepared import read_manifest

    manifest = read_manifest(spec.data)
    wanted = model_identity(spec.model).model_id
    if manifest["model"]["model_id"] != wanted:
        raise FitInputError(f"{spec.data} was prepared with model {manifest['model']['model_id']}, but fit trains "
                       f"{wanted}: prepare the clips with the model you train")
    return manifest


def run_fit(spec: FitSpec, lease: LeaseTicket | None = None) -> FitResult:
    """Fit the LoRA pair (resuming from the run's checkpoints) and publish it into
    `spec.out`. `lease`: the output lock the fit works under - the workers check it at
    every checkpoint and stop once it was taken over, and it is checked again before the
    LoRA is published (FitError naming the lock, nothing published). Skipped when
    `spec.out` already holds the published result of exactly this spec."""
    from storymem_model.training.prepared import PreparedDataError

    started = time.perf_counter()
    storage.filesystem(spec.out)
    try:
        manifest = check_data(spec)
    except PreparedDataError as exc:
        raise FitInputError(str(exc)) from None
    card = _existing_card(spec)
    if card is not None:
        return FitResult(out=spec.out, lora_dir=storage.join(spec.out, LORA_DIR), card=card, skipped=True)
    checkpoint = _train(spec, lease)
    return _publish(spec, manifest, checkpoint, time.perf_counter() - started)


def _existing_card(spec: FitSpec) -> dict | None:
    """The card of a finished fit of exactly this spec whose LoRA files are still there."""
    try:
        card = json.loads(storage.read_bytes(storage.join(spec.out, CARD_FILE)))
    except (FileNotFoundError, ValueError):
        return None
    if card.get("spec_sha256") != spec_digest(spec):
        return None
    for name, entry in card.get("lora_files", {}).items():
        uri = storage.join(spec.out, LORA_DIR, name)
        if not storage.exists(uri) or storage.sha256_hex(storage.read_bytes(uri)) != entry["sha256"]:
            return None
    return card


def ray_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train from a local path or s3:// URI."""
    if "://" not in uri:
        return os.path.abspath(uri), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(uri)
    return path, PyFileSystem(FSSpecHandler(fs))


def _train(spec: FitSpec, lease: LeaseTicket | None = None):
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import ray_session

    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    storage_path, filesystem = ray_storage(spec.checkpoint_uri)
    with ray_session(spec.ray_address):
        trainer = TorchTrainer(
            train_loop, train_loop_config={"spec": spec.to_dict(),
                                           "lease": lease.to_dict() if lease else None},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name(spec), storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints)))
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise FitError(f"training failed: {exc}") from exc
    if lease is not None and not lease.still_held():  # checked once more before publishing
        raise FitError(f"the output lock {lease.uri} was taken over by another run: the fit "
                       f"stopped at its next checkpoint and nothing was published")
    if result.checkpoint is None:
        raise FitError("training ended without a checkpoint")
    return result.checkpoint


def _publish(spec: FitSpec, manifest: dict, checkpoint, seconds: float) -> FitResult:
    """{out}/lora, metrics, validation and the card (last) from the final checkpoint."""
    from storymem_model.training.card import training_card
    from storymem_model.training.prepared import manifest_sha256

    with checkpoint.as_directory() as folder:
        state = json.loads(Path(folder, STATE_FILE).read_text())
        missing = [e for e in spec.experts if e not in state["completed"]]
        if missing:
            raise FitError(f"the last checkpoint has not finished expert(s) {missing}")
        released = {e: Path(folder, lora_files.EXPERT_FILES[e]).read_bytes() for e in state["completed"]}
        metrics = _read_rows(os.path.join(folder, METRICS_FILE))
        validation = _read_rows(os.path.join(folder, VALIDATION_FILE))
    lora_dir = storage.join(spec.out, LORA_DIR)
    written = {}
    for expert in ("high", "low"):
        uri = storage.join(lora_dir, lora_files.EXPERT_FILES[expert])
        if expert in released:
            storage.write_bytes(uri, released[expert])
            written[expert] = "trained"
        elif not storage.exists(uri):
            from safetensors.torch import load

            trained = load(next(iter(released.values())))
            storage.write_bytes(uri, lora_files.released_file_bytes(lora_files.zero_like_released(trained)))
            written[expert] = "zero"
        else:
            written[expert] = "kept"
    storage.write_bytes(storage.join(spec.out, METRICS_FILE), table_bytes(MetricRow.table(metrics)))
    if validation or spec.validate_every:
        storage.write_bytes(storage.join(spec.out, VALIDATION_FILE), table_bytes(ValidationRow.table(validation)))
    card = training_card(spec, manifest=manifest, manifest_sha256=manifest_sha256(spec.data),
                         lora_dir=lora_dir, experts=written, state=state, metrics=metrics,
                         validation=validation, run_name=run_name(spec), seconds=seconds)
    card["spec_sha256"] = spec_digest(spec)
    storage.write_bytes(storage.join(spec.out, CARD_FILE), json.dumps(card, indent=2, sort_keys=True).encode())
    return FitResult(out=spec.out, lora_dir=lora_dir, card=card, metrics=metrics)


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------------------------------
# Workers

def train_loop(config: dict) -> None:
    """The Ray Train worker function (every rank runs it)."""
    import ray.train

    from storymem_model.training.worker_loop import TrainingRun

    spec = FitSpec.from_dict(config["spec"])
    lease = LeaseTicket.from_dict(config["lease"]) if config.get("lease") else None
    context = ray.train.get_context()
    run = TrainingRun(spec, rank=context.get_world_rank(), world=context.get_world_size(),
                      device=_device(spec), reporter=_RayReporter(context.get_world_rank()),
                      still_held=lease.still_held if lease else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.restore(folder)
    run.run()


def _device(spec: FitSpec):
    import torch

    if spec.gpus_per_worker > 0:
        import ray.train.torch

        return ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    return torch.device("cpu")


class _RayReporter:
    """Checkpoints go to Ray Train: rank 0 writes the folder, every rank reports (a barrier)."""

    def __init__(self, rank: int):
        self.rank = rank

    def checkpoint(self, metrics: dict, write) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="storymem-ckpt-") as folder:
            write(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
