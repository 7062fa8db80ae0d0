"""Batch orchestration overhead: `storymem batch` on Ray vs the in-process story runner.

Tiny preset, the same 6 stories (2-3 shots each) rendered three ways into fresh folders:
1. in process, one after another, as `storymem render` does (`StoryRunner.render`);
2. `run_batch(BatchSpec(...))` with 1 worker on an embedded local Ray;
3. the same with 2 workers and the default scorer batching (up to 32 images per scorer
   call, at most 50 ms wait, no wait once both workers' requests are in), and with requests
   waiting up to 4 s for the other worker's (on real GPUs a shot takes minutes, so seconds
   of wait cost little).
Reported: wall times and the ratio batch(1 worker) / in-process (target <= 1.15), both for
the rendering part (first worker ready -> last story done, vs the runner loop without
loading: the per-story orchestration overhead the target is about) and for the whole
command, whose extra is a fixed start-up cost (embedded Ray start, three processes
importing torch on two cores) reported in seconds; scorer calls per shot and mean
requests and images per scorer batch. In-process and 1-worker runs are repeated
`--repeats` times, alternating, and the fastest of each is kept (a shared 2-core machine
is noisy).

`python -m bench.bench_batch [--stories N] [--repeats N] [--json FILE]`. Tiny models on a
CPU: the absolute numbers say little about real GPUs; the ratio is the orchestration
overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.json_results import write_json_results

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_RATIO = 1.15

_PROMPTS = [
    ["a lantern glows in a dark attic", "a hand lifts the lantern", "dust swirls in its light"],
    ["a sailboat leaves the harbour", "waves rise around the bow"],
    ["a cat watches rain on a window", "the cat follows a drop", "the rain stops"],
    ["a cyclist climbs a mountain road", "she reaches the pass at sunset"],
    ["a market opens at dawn", "a vendor stacks oranges", "the first customer arrives"],
    ["an owl lands on a fence post", "the owl turns its head"],
]


def write_stories(folder: str, count: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        prompts = _PROMPTS[i % len(_PROMPTS)]
        story = {"story_name": f"Bench story {i + 1}", "story_overview": "benchmark story",
                 "scenes": [{"scene_num": 1, "video_prompts": prompts,
                             "cut": [True] + [j % 2 == 0 for j in range(1, len(prompts))]}]}
        path = os.path.join(folder, f"story_{i + 1:02d}.json")
        with open(path, "w") as handle:
            json.dump(story, handle)
        paths.append(path)
    return paths


def tiny_render():
    """The RenderSpec both sides render with: the tiny preset on the CPU, its defaults
    (what `storymem render --preset tiny` resolves to)."""
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

    return resolve_render_spec(ModelSpec(preset="tiny"), ScorerSpec(preset="tiny"),
                               RenderSettings(), accelerator=False)


def in_process(paths: list[str], out: str) -> dict:
    import torch

    from storymem_model.runner import open_runner
    from storymem_model.story_script import load_script

    torch.set_num_threads(1)  # as each Ray worker does
    started = time.perf_counter()
    runner = open_runner(tiny_render())  # loads the pipeline and the scorers
    loaded = time.perf_counter()
    shots = 0
    for path in paths:
        shots += runner.render(load_script(path), out, progress=False).shots_rendered
    done = time.perf_counter()
    return {"wall_s": done - started, "render_s": done - loaded, "shots": shots}


def in_process_fresh(paths: list[str], out: str) -> dict:
    """`in_process` in a new Python process, as `storymem render` runs: a batch worker is
    a new process too, so neither side profits from warmed caches of an earlier run."""
    command = [sys.executable, "-m", "bench.bench_batch", "--in-process-run", out, *paths]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"in-process run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def batch(folder: str, out: str, workers: int, max_wait_s: float | None = None,
          max_batch_size: int | None = None) -> dict:
    from pipelines.batch import BatchOptions, BatchSpec, ScorerPoolOptions, run_batch

    scorers = ScorerPoolOptions()
    if max_wait_s is not None:
        scorers = ScorerPoolOptions(max_wait_s=max_wait_s, max_batch_size=max_batch_size)
    spec = BatchSpec(scripts=folder, out=out, render=tiny_render(), options=BatchOptions(
        workers=workers, cpus_per_worker=0.25, progress="log", scorers=scorers))
    started = time.perf_counter()
    summary = run_batch(spec)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "render_s": summary.render_wall_s,
            "shots": summary.shots_rendered, "failed": summary.failed,
            "scorer_calls_per_shot": summary.scorer_calls_per_shot,
            "scorer_mean_batch_requests": summary.scorer_mean_batch_requests,
            "scorer_mean_batch_items": _mean_batch_items(summary.scorers)}


def _mean_batch_items(scorers: dict) -> float:
    """Images (or embeddings) per scorer batch, over every method of both pools."""
    items = batches = 0
    for pool in scorers.values():
        for stats in (pool.get("methods") or {}).values():
            items += stats["items"]
            batches += stats["batches"]
    return items / batches if batches else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_batch")
    parser.add_argument("--stories", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of in-process and 1-worker batch; the fastest is kept")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--in-process-run", nargs="+", metavar=("OUT", "SCRIPT"),
                        help=argparse.SUPPRESS)  # one in-process run (see in_process_fresh)
    args = parser.parse_args(argv if argv is not None else [])
    if args.in_process_run:
        out, *paths = args.in_process_run
        print(json.dumps(in_process(paths, out)))
        return {}
    root = tempfile.mkdtemp(prefix="storymem-bench-batch-")
    try:
        scripts = os.path.join(root, "scripts")
        paths = write_stories(scripts, args.stories)
        inproc_runs, batch1_runs = [], []
        for repeat in range(max(1, args.repeats)):
            inproc_runs.append(in_process_fresh(paths,
                                                os.path.join(root, f"out_inprocess{repeat}")))
            batch1_runs.append(batch(scripts, os.path.join(root, f"out_batch1_{repeat}"), 1))
        results = {"stories": args.stories, "repeats": max(1, args.repeats),
                   "in_process": min(inproc_runs, key=lambda r: r["render_s"]),
                   "batch_1_worker": min(batch1_runs, key=lambda r: r["render_s"]),
                   "in_process_render_s_all": [r["render_s"] for r in inproc_runs],
                   "batch_1_worker_render_s_all": [r["render_s"] for r in batch1_runs],
                   "batch_2_workers": batch(scripts, os.path.join(root, "out_batch2"), 2),
                   # requests wait up to 4 s for the other worker's: two shots per forward
                   "batch_2_workers_wait": batch(scripts, os.path.join(root, "out_batch2w"), 2,
                                                 max_wait_s=4.0, max_batch_size=32)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results["in_process"]
    one, two = results["batch_1_worker"], results["batch_2_workers"]
    results["ratio_1_worker_wall"] = one["wall_s"] / base["wall_s"]
    results["startup_s_in_process"] = base["wall_s"] - base["render_s"]
    results["startup_s_batch_1_worker"] = one["wall_s"] - one["render_s"]
    results["ratio_1_worker_render"] = one["render_s"] / base["render_s"]
    results["ratio_2_workers_render"] = two["render_s"] / base["render_s"]
    results["target_ratio"] = TARGET_RATIO
    results["meets_target_render"] = results["ratio_1_worker_render"] <= TARGET_RATIO
    print(f"in-process runner : {base['wall_s']:7.1f} s total, {base['render_s']:7.1f} s "
          f"rendering, {base['shots']} shots")
    for label, r in (("batch, 1 worker", one), ("batch, 2 workers", two),
                     ("2 workers, 4 s wait", results["batch_2_workers_wait"])):
        print(f"{label:18s}: {r['wall_s']:7.1f} s total, {r['render_s']:7.1f} s rendering, "
              f"{r['shots']} shots, {r['scorer_calls_per_shot']:.2f} scorer calls/shot, "
              f"{r['scorer_mean_batch_requests']:.2f} requests and "
              f"{r['scorer_mean_batch_items']:.1f} images/scorer batch")
    print(f"overhead ratio (1 worker / in-process): rendering {results['ratio_1_worker_render']:.2f}"
          f" (target <= {TARGET_RATIO}), whole command {results['ratio_1_worker_wall']:.2f} "
          f"(fixed start-up and shut-down {results['startup_s_batch_1_worker']:.1f} s vs "
          f"{results['startup_s_in_process']:.1f} s in process); "
          f"2 workers rendering ratio {results['ratio_2_workers_render']:.2f}")
    write_json_results(args.json, results, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
