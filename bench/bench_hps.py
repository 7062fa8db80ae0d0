"""HPSv3 keyframe gate: batched scoring vs one image at a time, as the reference does it.

For the frames of one shot (default 81 frames of 480x832, as Wan2.2 makes them) the HPSv3
scores are computed four ways through `HPSScorer` (worker process in the HPS environment,
the real hpsv3 code):
1. `batched`: one `score_images(frames)` call (requests of `--max-batch-size` images);
2. `single`: one request per frame, the model loaded once;
3. `reference`: what the reference release does per shot: load the model, then score one
   frame at a time (`load_s` + `single`);
Reported (median of --repeats after a warm-up): wall seconds and CPU seconds (this process
plus the worker; on a shared, busy CPU the CPU seconds are the fair comparison), the ratios
single/batched and reference/batched, and the max |batched - single| score difference.

`python -m bench.bench_hps [--frames 81] [--height 480 --width 832] [--repeats 3]
[--max-batch-size 8] [--checkpoint FILE --base-model DIR --device cuda] [--json FILE]`.
Without --checkpoint it uses the tiny random HPSv3 (built once into a temp folder) on the
CPU: there the ratio shows the per-request overhead (pipe, preprocessing, Python) that
batching removes; the absolute numbers say nothing about the 7B model on a GPU.
Needs the HPS environment (`make hps-env`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from bench.json_results import write_json_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shot_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Image-like frames of one shot: a slowly moving colour gradient with a dark block."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height)[:, None]
    xs = np.linspace(0.0, 1.0, width)[None, :]
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        phase = index / max(count - 1, 1)
        mix = ((ys + xs * (0.5 + phase)) / 2.5)[..., None]
        frame = low * (1 - mix) + high * mix
        top, left = int(height * 0.2 + phase * height * 0.3), int(width * 0.3)
        frame[top:top + height // 4, left:left + width // 4] *= 0.4
        frames[index] = frame.clip(0, 255).astype(np.uint8)
    return frames


def _measure(scorer, fn, repeats: int) -> tuple[dict, object]:
    """Median wall seconds, client CPU seconds and worker CPU seconds of `fn()`."""
    walls, client, worker, result = [], [], [], None
    for _ in range(repeats):
        worker_before, cpu_before = scorer.worker_cpu_seconds_total, time.process_time()
        start = time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - start)
        client.append(time.process_time() - cpu_before)
        worker.append(scorer.worker_cpu_seconds_total - worker_before)
    cpu = [c + w for c, w in zip(client, worker)]
    return {"wall_s": statistics.median(walls), "client_cpu_s": statistics.median(client),
            "worker_cpu_s": statistics.median(worker), "cpu_s": statistics.median(cpu)}, result


def run(args) -> dict:
    from storymem_model.scorers.hps_scorer import HPSScorer, build_tiny_hps

    folder = None
    if args.checkpoint:
        checkpoint, base, label = args.checkpoint, args.base_model, "hpsv3"
    else:
        folder = tempfile.mkdtemp(prefix="storymem-bench-hps-")
        manifest = build_tiny_hps(folder, seed=0)
        checkpoint, base, label = (manifest["checkpoint_path"], manifest["base_model_path"],
                                   "hpsv3-tiny-random")
    frames = shot_frames(args.frames, args.height, args.width)
    try:
        start = time.perf_counter()
        scorer = HPSScorer(checkpoint, base, device=args.device, dtype=args.dtype,
                           max_batch_size=args.max_batch_size, num_threads=args.num_threads)
        load = {"wall_s": time.perf_counter() - start, "cpu_s": scorer.info["load_cpu_s"]}
        with scorer:
            scorer.score_images(frames[: min(2, len(frames))])  # warm-up
            batched, batched_scores = _measure(
                scorer, lambda: scorer.score_images(frames), args.repeats)
            single, single_scores = _measure(
                scorer, lambda: np.concatenate([scorer.score_images(f[None]) for f in frames]),
                args.repeats)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    reference = {key: load[key] + single[key] for key in ("wall_s", "cpu_s")}
    results = {"model": label, "device": args.device, "frames": args.frames,
               "frame_size": [args.height, args.width], "max_batch_size": args.max_batch_size,
               "load": load, "batched": batched, "single": single, "reference": reference,
               "max_abs_score_diff_batched_vs_single":
                   float(np.abs(batched_scores - single_scores).max())}
    for key in ("wall_s", "cpu_s"):
        results[f"ratio_single_over_batched_{key[:-2]}"] = single[key] / batched[key]
        results[f"ratio_reference_over_batched_{key[:-2]}"] = reference[key] / batched[key]
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_hps", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--checkpoint", help="real HPSv3 checkpoint (default: tiny random)")
    parser.add_argument("--base-model", help="local Qwen2-VL-7B-Instruct folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--num-threads", type=int, default=1, help="worker torch threads (CPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv if argv is not None else [])
    if bool(args.checkpoint) != bool(args.base_model):
        parser.error("--checkpoint and --base-model go together")
    results = run(args)
    print(f"HPSv3 ({results['model']}, {results['device']}), {results['frames']} frames "
          f"{args.height}x{args.width}, {args.max_batch_size} images per batched request:")
    print(f"  {'':28s} {'wall s':>8s} {'CPU s':>8s}   (CPU = client + worker process)")
    rows = [("model load (worker start)", results["load"]), ("batched", results["batched"]),
            ("one frame per request", results["single"]),
            ("reference (load + singles)", results["reference"])]
    for label, row in rows:
        print(f"  {label:28s} {row['wall_s']:8.2f} {row['cpu_s']:8.2f}")
    print(f"  {'single / batched':28s} {results['ratio_single_over_batched_wall']:8.2f} "
          f"{results['ratio_single_over_batched_cpu']:8.2f}")
    print(f"  {'reference / batched':28s} {results['ratio_reference_over_batched_wall']:8.2f} "
          f"{results['ratio_reference_over_batched_cpu']:8.2f}")
    print(f"  max |batched - single| score: {results['max_abs_score_diff_batched_vs_single']:.2e}")
    write_json_results(args.json, results, indent=2)
    return results


if __name__ == "__main__":
    main()
