"""Training one expert's LoRA on one rank of a torch.distributed group (docs/training.md#training).

`ExpertTrainer` holds the frozen expert with its rsLoRA adapter, parallelised across the
group, AdamW over the LoRA weights only, a linear warm-up, and does one optimiser step from
one noised sample per micro-step:

* parallelism: `fsdp` - FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer
  block and on the model, so each rank holds 1/world of every weight (with torch 2.14 this
  also runs on the CPU over gloo); `ddp` - a full replica per rank, LoRA gradients
  all-reduced;
* precision: on a GPU the base weights are bf16 and computed in bf16 (FSDP2 mixed precision:
  bf16 parameters, fp32 gradient reduction; DDP: autocast), the LoRA weights and the
  optimiser state fp32; on the CPU everything is fp32;
* activation checkpointing: diffusers' gradient checkpointing of every block;
* gradient accumulation over `grad_accum` micro-steps (gradient sync only on the last),
  clipping of the global norm, AdamW, warm-up; only parameters named `lora_` require grad.

State for checkpoints goes through `torch.distributed.checkpoint.state_dict` as full (not
sharded) state dicts of the trainable weights and of the optimiser, gathered to rank 0's
CPU memory, so a checkpoint does not depend on the number of ranks; every rank loads the
full dicts on resume, and a resumed run continues bit for bit on the CPU.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from storymem_model.model_loading import default_dtype
from storymem_model.rope import frame_positions
from storymem_model.specs import ModelSpec
from storymem_model.training.experts import load_expert
from storymem_model.training.lora import add_lora, lora_parameters
from storymem_model.training.samples import NoisedSample


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    grad_accum: int

    @classmethod
    def of(cls, spec) -> "OptimSettings":
        return cls(**{name: getattr(spec, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class StepResult:
    loss: float        # mean over micro-steps and ranks
    grad_norm: float   # before clipping
    lr: float          # the learning rate this step used
    peak_memory_gib: float  # the largest peak of any rank (GPU: allocated; CPU: process RSS)


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: allocated GPU memory, or the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def warmup_factor(warmup_steps: int):
    """LambdaLR factor: linear from 1/warmup to 1 over the first `warmup_steps` steps."""
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return factor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# bf16 on a GPU, fp32 on the CPU (the inference default); bench/bench_train.py imports this name
compute_dtype_for = default_dtype


class ExpertTrainer:
    """`ExpertTrainer.load(model_spec, expert, ...)` for a fit; `ExpertTrainer(module, ...)`
    for an expert already built (the benchmark's random full-size one)."""

    @classmethod
    def load(cls, model: ModelSpec, expert: str, *, device: torch.device, **kwargs) -> "ExpertTrainer":
        return cls(load_expert(model, expert, default_dtype(device)), device=device, **kwargs)

    def __init__(self, module, *, rank: int, alpha: float, seed: int, optim: OptimSettings,
                 device: torch.device, parallel: str = "fsdp", gradient_checkpointing: bool = True):
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.compute_dtype = default_dtype(self.device)
        self.optim = optim
        self.parallel = parallel
        add_lora(module, rank, alpha, seed)
        if gradient_checkpointing:
            module.enable_gradient_checkpointing()
        self.module = module
        # FSDP2 moves each rank's shards to the mesh's device, so the full expert never has
        # to fit on one GPU; `to` afterwards places what is not sharded (buffers).
        self.model = self._parallelise(module, parallel)
        module.to(self.device)
        self.optimizer = torch.optim.AdamW(lora_parameters(module), lr=optim.lr,
                                           weight_decay=optim.weight_decay, foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_factor(optim.warmup_steps))

    def _parallelise(self, module, parallel: str):
        if _world() == 1 and parallel == "ddp":
            return module
        if parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if not dist.is_initialized():
                return module
            mesh = init_device_mesh(self.device.type, (_world(),))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.on_gpu else MixedPrecisionPolicy()
            for block in module.blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(module, mesh=mesh, mp_policy=policy)
            return module
        if parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            module.to(self.device)  # DDP wraps a module already on its device
            return DistributedDataParallel(module, device_ids=[self.device.index] if self.on_gpu else None)
        raise ValueError(f"parallel must be 'fsdp' or 'ddp', got {parallel!r}")

    # ---------------------------------------------------------------------------- steps
    def loss(self, sample: NoisedSample) -> torch.Tensor:
        """Flow-matching loss of one sample: MSE between the predicted and the true velocity."""
        model_input = sample.model_input[None].to(self.device, self.compute_dtype)
        timestep = torch.tensor([sample.timestep], device=self.device, dtype=torch.float32)
        text = sample.text[None].to(self.device, self.compute_dtype)
        with frame_positions(self.module, sample.positions), warnings.catch_warnings(), \
                torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.on_gpu):
            # FSDP2 warns that the model returns a view; nothing here modifies it in place
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            prediction = self.model(model_input, timestep, text, return_dict=False)[0]
        return F.mse_loss(prediction.float(), sample.target[None].to(self.device, torch.float32))

    def _gradient_sync(self, enabled: bool):
        import contextlib

        if self.model is not self.module and hasattr(self.model, "no_sync"):  # DDP
            return contextlib.nullcontext() if enabled else self.model.no_sync()
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def step(self, samples: list[NoisedSample]) -> StepResult:
        """One optimiser step from `grad_accum` samples (this rank's)."""
        if len(samples) != self.optim.grad_accum:
            raise ValueError(f"a step takes {self.optim.grad_accum} samples per rank, got {len(samples)}")
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), dtype=torch.float64)
        for index, sample in enumerate(samples):
            with self._gradient_sync(index == len(samples) - 1):
                loss = self.loss(sample) / len(samples)
                loss.backward()
            total += loss.detach().double().cpu()
        parameters = lora_parameters(self.module)
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.optim.max_grad_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        peak = torch.tensor(peak_memory_gib(self.device), dtype=torch.float64)
        if _world() > 1:
            reduced = total.to(torch.float32).to(self._comm_device())
            dist.all_reduce(reduced)
            total = reduced.cpu().double() / _world()
            largest = peak.to(torch.float32).to(self._comm_device())
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
            peak = largest.cpu().double()
        return StepResult(loss=float(total), grad_norm=float(norm), lr=float(lr), peak_memory_gib=float(peak))

    def _comm_device(self) -> torch.device:
        return self.device if self.on_gpu else torch.device("cpu")

    # ---------------------------------------------------------------------------- state
    def state(self) -> dict:
        """Full state dicts of the LoRA weights and the optimiser, the scheduler state
        (collective: every rank calls it; gathered to rank 0's CPU memory - the other ranks
        get empty dicts, so no GPU ever holds the whole LoRA and optimiser state)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        lora = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        lora = {k: _full(v).detach().cpu().clone() for k, v in lora.items()}
        return {"lora": lora, "optimizer": _to_cpu(optimizer), "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.model, state["lora"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])

    def base_weights_sha256(self) -> str:
        """sha256 over every frozen weight of the expert (names and full values), on rank 0
        (collective: the other ranks help gather the shards and get ""): the same before
        and after training proves the base weights were not touched."""
        hashing = not dist.is_initialized() or dist.get_rank() == 0
        digest = hashlib.sha256()
        for name, parameter in sorted(self.module.named_parameters(), key=lambda item: item[0]):
            if ".lora_" in name:
                continue
            value = _full(parameter.detach())
            if hashing:
                value = value.cpu().contiguous()
                digest.update(name.encode("utf-8"))
                digest.update(str(value.dtype).encode("utf-8"))
                digest.update(value.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest() if hashing else ""

    def trained_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, full, by module name, on rank 0 (collective; other ranks get {})."""
        return self.state()["lora"]


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return _full(value).detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
