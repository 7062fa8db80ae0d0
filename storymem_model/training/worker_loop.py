"""What every rank of a fit runs (without Ray: checkpoints go through a `reporter`).

`TrainingRun(spec, rank, world, device, reporter)`: `restore(folder)` from a checkpoint
folder, then `run()`: for each expert of the spec not finished yet, an `ExpertTrainer`
and its steps, each step reading this rank's samples in the seeded data order; every
`checkpoint_every` steps and at the end of each expert the state is checkpointed through
`reporter.checkpoint(metrics, write)`, where `write(folder)` fills a checkpoint folder (rank
0's is kept). `--validate-every K` renders the validation story on rank 0 after every K
steps, the other ranks waiting. `still_held` (the flow's output lock, `LeaseTicket`): checked
by rank 0 at every checkpoint; once the lock was taken over, every rank stops there, before
writing that checkpoint.

Checkpoint folder: `state.json` (expert, step, samples_seen, finished experts, resumes),
`trainer.pt` (the unfinished expert's LoRA, optimiser and scheduler state),
`backbone_{high,low}_noise.safetensors` of finished experts (released format),
`metrics.parquet` and `validation.parquet` (rows so far).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import time
from typing import Callable, Protocol

import pyarrow.parquet as pq
import torch

from storymem_model import storage
from storymem_model.training import lora as lora_files
from storymem_model.training.data_order import rank_samples, row_for, sample_generator
from storymem_model.training.expert_trainer import ExpertTrainer, OptimSettings
from storymem_model.training.prepared import PreparedData
from storymem_model.training.records import MetricRow, ValidationRow
from storymem_model.training.samples import NoisedSample, SampleSettings, draw_sample
from storymem_model.training.specs import FitSpec

log = logging.getLogger("storymem.train")

STATE_FILE = "state.json"
TRAINER_FILE = "trainer.pt"
METRICS_FILE = "metrics.parquet"
VALIDATION_FILE = "validation.parquet"
LOG_EVERY = 10


class Reporter(Protocol):
    def checkpoint(self, metrics: dict, write: Callable[[str], None]) -> None: ...


class TrainingRun:
    def __init__(self, spec: FitSpec, *, rank: int, world: int, device: torch.device, reporter: Reporter,
                 still_held: Callable[[], bool] | None = None):
        self.spec = spec
        self.still_held = still_held
        self.stopped = False  # the output lock was taken over
        self.rank = rank
        self.world = world
        self.device = torch.device(device)
        self.reporter = reporter
        self.data = PreparedData(spec.data)
        self.settings = SampleSettings.of(spec)
        self.state: dict = {"expert": None, "step": 0, "samples_seen": 0, "completed": {}, "resumes": [],
                            "base_weights": {}}
        self.metrics: list[dict] = []
        self.validation: list[dict] = []
        self.released: dict[str, bytes] = {}
        self.trainer_state: dict | None = None
        self.reported = False

    # ---------------------------------------------------------------------------- resume
    def restore(self, folder: str) -> None:
        with open(os.path.join(folder, STATE_FILE)) as handle:
            self.state = json.load(handle)
        self.metrics = _rows(os.path.join(folder, METRICS_FILE))
        self.validation = _rows(os.path.join(folder, VALIDATION_FILE))
        for expert in self.state["completed"]:
            with open(os.path.join(folder, lora_files.EXPERT_FILES[expert]), "rb") as handle:
                self.released[expert] = handle.read()
        trainer_file = os.path.join(folder, TRAINER_FILE)
        if os.path.exists(trainer_file):
            self.trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=True)
        self.state["resumes"].append({"expert": self.state["expert"], "step": self.state["step"],
                                      "samples_seen": self.state["samples_seen"], "at": time.time()})
        if self.rank == 0:
            log.info("resuming from the checkpoint of %s step %d (%d samples seen)", self.state["expert"],
                     self.state["step"], self.state["samples_seen"])

    # ---------------------------------------------------------------------------- run
    def run(self) -> None:
        for expert in self.spec.experts:
            if expert not in self.state["completed"]:
                self._train_expert(expert)
            if self.stopped:
                return
        if not self.reported:  # restored after the end: report the final state again
            self._checkpoint(None, {"step": self.state["step"], "expert": self.state["expert"], "done": True})

    def _train_expert(self, expert: str) -> None:
        spec = self.spec
        resuming = self.state["expert"] == expert
        step = self.state["step"] if resuming else 0
        samples_seen = self.state["samples_seen"] if resuming else 0
        trainer = ExpertTrainer.load(spec.model, expert, rank=spec.rank, alpha=spec.alpha, seed=spec.seed,
                                     optim=OptimSettings.of(spec), device=self.device, parallel=spec.parallel,
                                     gradient_checkpointing=spec.gradient_checkpointing)
        if resuming and self.trainer_state is not None:
            trainer.load_state(self.trainer_state)
        self.trainer_state = None
        base = self.state.setdefault("base_weights", {}).setdefault(expert, {})
        base.setdefault("sha256_before", trainer.base_weights_sha256())  # collective
        while step < spec.steps:
            started = time.perf_counter()
            samples = [self.sample(expert, n) for n in rank_samples(samples_seen, self.rank, self.world,
                                                                    spec.grad_accum)]
            result = trainer.step(samples)
            step += 1
            samples_seen += self.world * spec.grad_accum
            seconds = time.perf_counter() - started
            row = MetricRow(step=step, expert=expert, loss=result.loss, lr=result.lr,
                            samples_per_s=self.world * spec.grad_accum / seconds, grad_norm=result.grad_norm,
                            seconds=seconds, samples_seen=samples_seen, peak_memory_gib=result.peak_memory_gib)
            self.metrics.append(row.to_row())
            if self.rank == 0 and (step % LOG_EVERY == 0 or step == spec.steps):
                log.info("%s step %d/%d loss %.5f lr %.3g %.2f samples/s", expert, step, spec.steps,
                         result.loss, result.lr, row.samples_per_s)
            finished = step == spec.steps
            if spec.validate_every and (step % spec.validate_every == 0 or finished):
                self._validate(trainer, expert, step)
            if finished or step % spec.checkpoint_every == 0:
                if self._lock_lost():  # collective
                    self.stopped = True
                    log.error("%s step %d: the output lock was taken over by another run; stopped "
                              "without writing this checkpoint", expert, step)
                    return
                state = trainer.state()  # collective
                self.state.update(expert=expert, step=step, samples_seen=samples_seen)
                if finished:
                    base["sha256_after"] = trainer.base_weights_sha256()  # collective
                    self.released[expert] = lora_files.released_file_bytes(
                        lora_files.released_state(state["lora"], spec.rank, spec.alpha))
                    self.state["completed"][expert] = {"steps": step, "samples_seen": samples_seen}
                self._checkpoint(None if finished else state,
                                 {"step": step, "expert": expert, "loss": result.loss})
        del trainer
        gc.collect()

    def sample(self, expert: str, number: int) -> NoisedSample:
        """Sample number `number` of `expert`'s run (see `data_order`)."""
        clip = self.data.row(row_for(number, len(self.data), self.spec.seed))
        geometry = self.data.geometry
        return draw_sample(clip, self.data.zero_condition, num_frames=int(geometry["num_frames"]),
                           text_length=self.data.text_length, expert=expert, settings=self.settings,
                           generator=sample_generator(self.spec.seed, expert, number))

    def _lock_lost(self) -> bool:
        """Rank 0's verdict on the output lock, shared with every rank (collective)."""
        import torch.distributed as dist

        if self.still_held is None:
            return False
        lost = torch.tensor([int(self.rank == 0 and not self.still_held())], device=self.device)
        if dist.is_initialized():
            dist.broadcast(lost, src=0)
        return bool(lost.item())

    # ---------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, trainer_state: dict | None, metrics: dict) -> None:
        def write(folder: str) -> None:
            with open(os.path.join(folder, STATE_FILE), "w") as handle:
                json.dump(self.state, handle, indent=2, sort_keys=True)
            if trainer_state is not None:
                torch.save(trainer_state, os.path.join(folder, TRAINER_FILE))
            for expert, data in self.released.items():
                with open(os.path.join(folder, lora_files.EXPERT_FILES[expert]), "wb") as handle:
                    handle.write(data)
            pq.write_table(MetricRow.table(self.metrics), os.path.join(folder, METRICS_FILE))
            pq.write_table(ValidationRow.table(self.validation), os.path.join(folder, VALIDATION_FILE))

        self.reporter.checkpoint(metrics, write)
        self.reported = True

    # ---------------------------------------------------------------------------- validation
    def _validate(self, trainer: ExpertTrainer, expert: str, step: int) -> None:
        import torch.distributed as dist

        from storymem_model.training.validation import validate_lora

        state = lora_files.released_state(trainer.trained_lora(), self.spec.rank, self.spec.alpha)  # collective
        if self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="storymem-val-lora-") as folder:
                self._write_pair(folder, expert, state)
                model = self.spec.model.resolved(accelerator=self.device.type == "cuda").replace(
                    device=str(self.device))
                out = storage.join(self.spec.out, "validation", f"{expert}-step{step:06d}")
                row = validate_lora(self.spec.validation, model, folder, out, step=step, expert=expert)
            self.validation.append(row.to_row())
            log.info("validation %s step %d: consistency %.4f (all pairs), %.4f (top 10)", expert, step,
                     row.consistency_all_pairs, row.consistency_top10)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's render

    def _write_pair(self, folder: str, expert: str, state: dict) -> None:
        """The current LoRA pair: this expert's weights now, the other expert's finished
        file, or a zero LoRA when it has none."""
        for name in ("high", "low"):
            path = os.path.join(folder, lora_files.EXPERT_FILES[name])
            if name == expert:
                data = lora_files.released_file_bytes(state)
            elif name in self.released:
                data = self.released[name]
            else:
                data = lora_files.released_file_bytes(lora_files.zero_like_released(state))
            with open(path, "wb") as handle:
                handle.write(data)


def _rows(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist() if os.path.exists(path) else []
