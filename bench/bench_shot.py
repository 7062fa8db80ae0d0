"""One shot of the model core: time and peak memory vs memory size, and batched vs sequential CFG.

Default: the tiny preset on this machine's CPU, tiny defaults (17 frames, 64x64, 4 steps),
memory given as precomputed keyframe latents (as the story runner does). Reported:
seconds per shot (median of --repeats) and peak memory above the idle baseline for 0, 3 and
10 memory frames, then batched vs sequential classifier-free guidance with 10 memory frames,
printed as ratios against the 0-memory / batched runs.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process RSS sampled every
millisecond (approximate: allocator caching hides part of the freed memory).

`python -m bench.bench_shot [--preset tiny|FOLDER] [--device cpu|cuda] [--repeats N]
[--steps N] [--json FILE]`. Tiny numbers only show relative costs; the real model's costs
are in facts §9 (attention dominates with 10 memory frames).
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np

MEMORY_SIZES = (0, 3, 10)


class PeakMemory:
    """Peak memory (bytes) above the level at entry, for CPU (RSS sampling) or CUDA."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self._top = self._base
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self._top = max(self._top, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._running = False
            self._thread.join()
            self._top = max(self._top, self._process.memory_info().rss)
            self.peak = self._top - self._base
        return False


def measure(pipe, repeats: int, **kwargs) -> dict:
    times, peaks = [], []
    for index in range(repeats):
        with PeakMemory(pipe.device) as peak:
            start = time.perf_counter()
            pipe.generate_shot("A lighthouse keeper lights the lamp at dusk.", seed=index, **kwargs)
            times.append(time.perf_counter() - start)
        peaks.append(peak.peak)
    return {"seconds": statistics.median(times), "peak_mb": max(peaks) / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv if argv is not None else [])

    import torch

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
    print(f"{'run':<26}{'s/shot':>9}{'peak MB':>10}{'time x':>9}{'mem x':>8}")
    for name, row in rows.items():
        reference = batched if "cfg=" in name else base
        time_ratio = row["seconds"] / reference["seconds"]
        memory_ratio = row["peak_mb"] / reference["peak_mb"] if reference["peak_mb"] > 0 else float("nan")
        row.update(time_ratio=time_ratio, memory_ratio=memory_ratio)
        print(f"{name:<26}{row['seconds']:>9.3f}{row['peak_mb']:>10.1f}{time_ratio:>9.2f}{memory_ratio:>8.2f}")
    print("ratios: memory rows vs memory=0; cfg rows vs batched CFG with 10 memory frames")
    result = {"model_id": pipe.model_id, "device": str(pipe.device), "load_seconds": load_seconds, "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
