"""One shot of the model core: time and peak memory vs memory size, and batched vs sequential CFG.

Default: the tiny preset on this machine's CPU, tiny defaults (17 frames, 64x64, 4 steps),
memory given as precomputed keyframe latents (as the story runner does). Reported:
seconds per shot (median of --repeats) and peak memory above the idle baseline for 0, 3 and
10 memory frames, then batched vs sequential classifier-free guidance with 10 memory frames,
printed as ratios against the 0-memory / batched runs.

Peak memory, above what was allocated before the call, for the whole shot and for the
denoising alone (decoding dominates the tiny shot): on CUDA `torch.cuda.max_memory_allocated`;
on CPU the bytes of live tensors counted by a TorchDispatchMode (`LiveTensorBytes`).

`python -m bench.bench_shot [--preset tiny|FOLDER] [--device cpu|cuda] [--repeats N]
[--steps N] [--json FILE]`. Tiny numbers only show relative costs; the real model's costs
are in docs/method.md#cost-of-a-shot (attention dominates with 10 memory frames).
"""
from __future__ import annotations

import argparse
import statistics
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.json_results import write_json_results

MEMORY_SIZES = (0, 3, 10)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensors alive at once, counted per storage as ops create them.

    An approximation of the allocator's peak (views and storages freed while a view survives
    are attributed to their first tensor), but exact enough to compare runs.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owned: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._owned.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._owned:
                    self._owned[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._free, key)
        return out


def peak_megabytes(pipe, call) -> float:
    """Peak memory (MB) of `call()` above what was allocated before it."""
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorBytes() as tracker:
        call()
    return tracker.peak / 2**20


def measure(pipe, repeats: int, **kwargs) -> dict:
    prompt = "A lighthouse keeper lights the lamp at dusk."
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        pipe.generate_shot(prompt, seed=index, **kwargs)
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times),
        "peak_mb": peak_megabytes(pipe, lambda: pipe.generate_shot(prompt, **kwargs)),
        "denoise_peak_mb": peak_megabytes(pipe, lambda: pipe.generate_shot_latents(prompt, **kwargs)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv if argv is not None else [])

    import storymem_model
    import storymem_model.lora_loading  # noqa: F401 - library imports are not load time
    import storymem_model.shot_pipeline  # noqa: F401
    import storymem_model.tiny_models  # noqa: F401

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = storymem_model.load_pipeline(args.preset, device=args.device)
    load_seconds = time.perf_counter() - start
    height, width = pipe.default_height, pipe.default_width
    sampling = {} if args.steps is None else {"num_inference_steps": args.steps}
    keyframes = np.random.default_rng(0).integers(0, 256, (max(MEMORY_SIZES), height, width, 3), dtype=np.uint8)
    latents = pipe.encode_keyframes(keyframes, height, width)
    pipe.generate_shot("warm-up", memory_latents=latents[:1], **sampling)

    rows = {}
    for size in MEMORY_SIZES:
        rows[f"memory={size}"] = measure(pipe, args.repeats, memory_latents=latents[:size], **sampling)
    for mode in ("batched", "sequential"):
        rows[f"memory=10 cfg={mode}"] = measure(pipe, args.repeats, memory_latents=latents, cfg_mode=mode,
                                                **sampling)

    base = rows["memory=0"]
    batched = rows["memory=10 cfg=batched"]
    print(f"model {pipe.model_id} on {pipe.device} ({pipe.dtype}); load {load_seconds:.2f} s; "
          f"{pipe.default_num_frames} frames {width}x{height}, "
          f"{sampling.get('num_inference_steps', pipe.default_sampling['num_inference_steps'])} steps")
    print(f"{'run':<26}{'s/shot':>9}{'peak MB':>9}{'denoise MB':>11}{'time x':>8}{'mem x':>7}{'denoise x':>10}")
    for name, row in rows.items():
        reference = batched if "cfg=" in name else base
        row.update(time_ratio=row["seconds"] / reference["seconds"],
                   memory_ratio=row["peak_mb"] / reference["peak_mb"],
                   denoise_memory_ratio=row["denoise_peak_mb"] / reference["denoise_peak_mb"])
        print(f"{name:<26}{row['seconds']:>9.3f}{row['peak_mb']:>9.2f}{row['denoise_peak_mb']:>11.3f}"
              f"{row['time_ratio']:>8.2f}{row['memory_ratio']:>7.2f}{row['denoise_memory_ratio']:>10.2f}")
    print("ratios: memory rows vs memory=0; cfg rows vs batched CFG with 10 memory frames")
    result = {"model_id": pipe.model_id, "device": str(pipe.device), "load_seconds": load_seconds, "rows": rows}
    write_json_results(args.json, result, indent=2)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
