"""Keyframe extraction for one shot: embed/score every frame once in batches vs frame by frame.

For the frames of one shot (default 81 frames of 480x832, as Wan2.2 makes them):
1. `batched`: what storymem does - `extract_keyframes`: every frame embedded once and
   gate-scored once, in batches, then the threshold loop on the cached similarity matrix;
2. `frame_by_frame`: the reference release's pattern - for every comparison both frames are
   preprocessed and embedded again (one image per call), the gate scores one frame per call
   each time a frame is checked, and the whole scan is repeated for every 0.01 threshold
   drop; then each keyframe is compared with every memory image by embedding both again.
Both must pick the same frames (checked). Reported: seconds for each, the ratio, the
number of threshold scans, CLIP/gate calls of the frame-by-frame path, and the tiny CLIP's
time for 17 frames of 64x64.

The scorers are the tiny ones (random CLIP and aesthetic head; `--device cuda` for a GPU),
the gate threshold set so a quarter of the synthetic frames fail it.
The HPSv3 part (batch vs single image scoring, the reference's gate) is measured by the HPS
benchmark, reached through `hps_batch_vs_single` below.

`python -m bench.bench_keyframes [--frames 81] [--height 480 --width 832] [--memory 6]
[--device cpu] [--threads 1] [--json FILE]`
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from bench.json_results import write_json_results


def shot_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A shot with content that changes: a drifting colour field, a moving bright disc,
    a cut to another palette two thirds in, and a little sensor noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    palette = rng.uniform(0, 255, (2, 3, 3)).astype(np.float32)
    for index in range(count):
        phase = index / max(count - 1, 1)
        colours = palette[int(phase > 2 / 3)]
        mix = ((xs / width + ys / height * (0.5 + phase)) / 2.0)[..., None]
        frame = colours[0] * (1 - mix) + colours[1] * mix
        cy, cx = height * (0.3 + 0.4 * phase), width * (0.2 + 0.6 * phase)
        disc = ((ys - cy) ** 2 + (xs - cx) ** 2) < (0.15 * min(height, width)) ** 2
        frame[disc] = colours[2]
        frame += rng.normal(0, 4, frame.shape).astype(np.float32)
        frames[index] = frame.clip(0, 255).astype(np.uint8)
    return frames


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def frame_by_frame(frames, memory_images, scorers, threshold=0.9, step=0.01,
                   max_keyframes=3, duplicate_threshold=0.9) -> tuple[list[int], dict]:
    """The reference release's extraction pattern (docs/method.md#keyframes), on the same scorers."""
    embed = _Counted(lambda image: scorers.embedder.embed_images(image[None])[0])
    score = _Counted(lambda image: float(scorers.gate.score_images(image[None])[0]))
    similarity = lambda a, b: float(np.dot(embed(a), embed(b)))  # noqa: E731
    low_quality = lambda image: score(image) < scorers.gate_threshold  # noqa: E731
    scans = 0
    while True:
        scans += 1
        first = 0
        while low_quality(frames[first]):
            first += 1
            if first >= len(frames):
                return [], {"scans": scans, "clip_calls": embed.calls, "gate_calls": score.calls}
        chosen, last = [first], frames[first]
        for index in range(2, len(frames)):
            if similarity(last, frames[index]) < threshold and not low_quality(frames[index]):
                chosen.append(index)
                last = frames[index]
        if len(chosen) > max_keyframes:
            threshold -= step
        else:
            break
    stored = [i for i in chosen
              if not any(similarity(frames[i], m) > duplicate_threshold for m in memory_images)]
    return stored, {"scans": scans, "clip_calls": embed.calls, "gate_calls": score.calls}


def hps_batch_vs_single(args) -> dict | None:
    """HOOK for the HPS part (batch vs single-image HPSv3 scoring of one shot).

    Filled by the HPS benchmark (`bench/bench_hps.py`, needs `make hps-env`); this
    benchmark only says where to find it, so `make bench` does not run HPS twice.
    """
    return {"see": "python -m bench.run_all hps (bench/bench_hps.py)"}


def run(args) -> dict:
    import torch

    from storymem_model.keyframe_selection import extract_keyframes
    from storymem_model.scorers import build_scorers

    logging.getLogger().setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    scorers = build_scorers("tiny", device=args.device)
    frames = shot_frames(args.frames, args.height, args.width)
    # The tiny gate's documented threshold is tuned to tiny renders; on these synthetic
    # frames let a quarter of the frames fail it, so the scans do real work.
    # The threshold lies halfway between two scores: no frame sits on it, so the last-bit
    # differences between batched and single-image scores cannot flip a decision.
    ranked = np.sort(scorers.gate.score_images(frames))
    quarter = len(ranked) // 4
    threshold = float(ranked[quarter - 1] + ranked[quarter]) / 2 if quarter else -np.inf
    scorers = build_scorers("tiny", device=args.device, gate_threshold=threshold)
    memory_images = shot_frames(args.memory, args.height, args.width, seed=1)
    memory = scorers.embedder.embed_images(memory_images) if args.memory else None
    extract_keyframes(frames[:4], scorers)  # warm-up

    start = time.perf_counter()
    batched = extract_keyframes(frames, scorers, memory)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    reference, counts = frame_by_frame(frames, list(memory_images), scorers)
    reference_s = time.perf_counter() - start

    small = shot_frames(17, 64, 64, seed=2)
    scorers.embedder.embed_images(small)
    start = time.perf_counter()
    scorers.embedder.embed_images(small)
    tiny_17_s = time.perf_counter() - start
    return {
        "frames": args.frames, "size": f"{args.height}x{args.width}",
        "memory_images": args.memory, "device": args.device, "scorers": "tiny",
        "batched_s": batched_s, "frame_by_frame_s": reference_s,
        "ratio_frame_by_frame_over_batched": reference_s / batched_s,
        "same_keyframes": batched.indices == reference, "keyframes": batched.indices,
        "candidates": batched.candidates, **counts,
        "tiny_clip_17x64x64_s": tiny_17_s,
        "hps": hps_batch_vs_single(args),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_keyframes", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--memory", type=int, default=6, help="memory images to dedup against")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv if argv is not None else [])
    result = run(args)
    print(f"keyframes for one shot ({result['frames']} frames {result['size']}, "
          f"{result['memory_images']} memory images, tiny scorers on {result['device']}):")
    print(f"  batched once      {result['batched_s']:8.3f} s")
    print(f"  frame by frame    {result['frame_by_frame_s']:8.3f} s  ({result['scans']} scans, "
          f"{result['clip_calls']} CLIP calls, {result['gate_calls']} gate calls)")
    print(f"  ratio             {result['ratio_frame_by_frame_over_batched']:8.1f} x")
    print(f"  same keyframes    {result['same_keyframes']} {result['keyframes']}")
    print(f"  tiny CLIP, 17 frames 64x64: {result['tiny_clip_17x64x64_s'] * 1000:.1f} ms")
    print(f"  HPS batch vs single: {result['hps']}")
    write_json_results(args.json, result, indent=1)
    if not result["same_keyframes"]:
        raise AssertionError("batched and frame-by-frame extraction picked different frames")
    return result


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
