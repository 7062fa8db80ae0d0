"""The cost of training a StoryMem LoRA.

`--size tiny` (default, runs on a CPU): a small clip set made in code is prepared on Ray Data
and fitted on Ray Train (the `storymem train` code, tiny preset, `--workers` CPU workers,
FSDP2 over gloo); reported: prepare seconds, fit seconds, median samples/s of the steps,
the largest peak memory of any worker (process RSS), the loss drop.

`--size a14b` (needs a CUDA GPU): one full-size Wan2.2 A14B expert (dim 5120, 40 layers)
with random weights in bf16, the rsLoRA r = alpha = 128 on the ten targets of every block,
gradient checkpointing, AdamW; one sample = a 480x832 81-frame shot (21 latent frames) plus
10 memory latents (31 latent frames, 48,360 tokens) and 512 text tokens. Reported: seconds
per optimiser step (forward, recomputation, backward, AdamW) and peak GPU memory, with the
step's FLOPs (about 4 forwards with checkpointing: `bench_gpu.forward_flops`). One process,
one GPU, no sharding: with FSDP over W GPUs the weights take 1/W of the memory each.
`--size tiny-step` runs that same single-process step with the tiny expert on the CPU.

    python -m bench.bench_train                          # tiny, 2 CPU workers
    python -m bench.bench_train --size a14b --json bench/results/train-gpu-<device>.json
    python -m bench.bench_train --size tiny-step --device cpu
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench.json_results import write_json_results

MEMORY_LATENTS = 10


def _tiny_fit(args) -> dict:
    import pyarrow.parquet as pq

    from pipelines.ray_runtime import ray_session
    from pipelines.training.fit import run_fit
    from pipelines.training.prepare import run_prepare
    from storymem_model import storage
    from storymem_model.specs import ModelSpec, ScorerSpec
    from storymem_model.training.specs import FitSpec, PrepareSpec
    from storymem_model.video_io import encode_mp4

    import json
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="storymem-bench-train-") as root, \
            ray_session(args.ray_address, num_cpus=args.cpus):
        rows = []
        for group in range(args.clips // 2):
            for shot in range(2):
                rng = np.random.default_rng(10 * group + shot)
                base = np.full((40, 48, 3), 60 + 50 * group, float) + np.linspace(0, 60, 48)[None, :, None]
                frames = [np.clip(base + rng.normal(0, 8, base.shape) + 2 * i, 0, 255).astype(np.uint8)
                          for i in range(14)]
                uri = f"{root}/clips/g{group}-{shot}.mp4"
                storage.write_bytes(uri, encode_mp4(np.stack(frames), 16))
                rows.append({"clip_uri": uri, "caption": f"group {group} shot {shot}", "group_id": f"g{group}",
                             "order": shot})
        storage.write_bytes(f"{root}/clips.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
        cpus = args.cpus / max(args.workers, 1) if args.cpus else 1.0
        prepare = PrepareSpec(clips=f"{root}/clips.jsonl", out=f"{root}/prepared", model=ModelSpec(preset="tiny"),
                              scorers=ScorerSpec(preset="tiny"), height=32, width=32, num_frames=9,
                              workers=args.workers, cpus_per_worker=cpus)
        started = time.perf_counter()
        run_prepare(prepare)
        prepare_s = time.perf_counter() - started
        fit = FitSpec(data=prepare.out, out=f"{root}/fit", model=ModelSpec(preset="tiny"), steps=args.steps,
                      expert="high", workers=args.workers, cpus_per_worker=cpus, lr=4e-3, warmup_steps=4,
                      checkpoint_every=max(1, args.steps // 2), parallel=args.parallel)
        started = time.perf_counter()
        run_fit(fit)
        fit_s = time.perf_counter() - started
        metrics = pq.read_table(f"{root}/fit/metrics.parquet").to_pylist()
    losses = [m["loss"] for m in metrics]
    window = max(1, len(losses) // 5)
    return {"size": "tiny", "device": "cpu", "workers": args.workers, "parallel": args.parallel,
            "clips": len(rows), "steps": args.steps, "prepare_s": prepare_s, "fit_s": fit_s,
            "median_samples_per_s": statistics.median(m["samples_per_s"] for m in metrics),
            "peak_memory_gib_per_worker": max(m["peak_memory_gib"] for m in metrics),
            "mean_loss_first_steps": statistics.mean(losses[:window]),
            "mean_loss_last_steps": statistics.mean(losses[-window:])}


def expert_step(config: dict, shot: dict, device: torch.device, repeats: int, rank: int) -> dict:
    """Seconds per optimiser step and peak memory of one expert's LoRA training, one process."""
    from bench.bench_gpu import build_expert, forward_flops
    from storymem_model.rope import memory_rope_positions
    from storymem_model.training.expert_trainer import ExpertTrainer, OptimSettings, compute_dtype_for
    from storymem_model.training.samples import NoisedSample

    dtype = compute_dtype_for(device)
    module = build_expert(config, device, dtype)
    trainer = ExpertTrainer(module, rank=rank, alpha=float(rank), seed=0, device=device, parallel="ddp",
                            optim=OptimSettings(lr=1e-5, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                                                grad_accum=1))
    frames = shot["latent_frames"] + MEMORY_LATENTS
    size = (frames, shot["latent_height"], shot["latent_width"])
    generator = torch.Generator().manual_seed(0)
    sample = NoisedSample(
        model_input=torch.randn(config["in_channels"], *size, generator=generator),
        timestep=950.0, sigma=0.95, target=torch.randn(config["out_channels"], *size, generator=generator),
        positions=memory_rope_positions(MEMORY_LATENTS, shot["latent_frames"], 5),
        text=torch.randn(shot["text_tokens"], config["text_dim"], generator=generator), variant="mi2v",
        num_memory=MEMORY_LATENTS)
    trainer.step([sample])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer.step([sample])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    tokens = frames * (shot["latent_height"] // 2) * (shot["latent_width"] // 2)
    flops = 4 * forward_flops(config, tokens, shot["text_tokens"])  # forward, recompute, backward (2x)
    seconds = statistics.median(times)
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    return {"seconds_per_step": seconds, "tokens": tokens, "flops_per_step": flops,
            "achieved_tflops": flops / seconds / 1e12, "lora_parameters": trainable,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                else None)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "a14b", "tiny-step"], default="tiny")
    parser.add_argument("--device", default=None, help="a14b / tiny-step: torch device")
    parser.add_argument("--workers", type=int, default=2, help="tiny: Ray Train workers")
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="tiny: parallelism")
    parser.add_argument("--steps", type=int, default=40, help="tiny: fit steps")
    parser.add_argument("--clips", type=int, default=8, help="tiny: clips made and prepared")
    parser.add_argument("--cpus", type=float, default=None, help="tiny: CPUs of an embedded Ray")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="a14b / tiny-step: timed steps")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv if argv is not None else [])
    if args.size == "tiny":
        report = _tiny_fit(args)
    else:
        from bench.bench_gpu import device_peak, expert_and_shot, skipped_without_gpu
        from storymem_model.presets import REAL_LORA_RANK, TINY

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.size == "a14b" and device.type != "cuda":
            return skipped_without_gpu("bench_train", args.json,
                                       " (see docs/training.md for the estimate)")
        config, shot = expert_and_shot("a14b" if args.size == "a14b" else "tiny")
        rank = REAL_LORA_RANK if args.size == "a14b" else TINY.lora_rank
        device_name, peak = device_peak(device)
        report = {"size": args.size, "device": device_name, "peak_bf16_tflops": peak, "config": config,
                  "shot": shot, "memory_latents": MEMORY_LATENTS, "lora_rank": rank, "torch": torch.__version__,
                  **expert_step(config, shot, device, args.repeats, rank)}
    for key, value in report.items():
        if not isinstance(value, dict):
            print(f"{key:28s} {value}")
    write_json_results(args.json, report, indent=1)
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
