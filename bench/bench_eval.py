"""ST-Bench evaluation costs: ViCLIP video embedding, decoding + aesthetic scoring, metrics.

Reported (median of --repeats):
- ViCLIP `embed_videos` seconds per video (8 sampled frames of an 81-frame 480x832 shot,
  resized to the model's input) and videos/s, at the --size given: "full" builds the real
  ViT-L/14 + text architecture with random weights (the released checkpoint's compute;
  use it on a GPU), "tiny" the tiny preset (default on CPU);
- decoding one H.264 shot (imageio-ffmpeg) and scoring its frames with the aesthetic
  predictor (tiny head on tiny CLIP here; the real ViT-L/14 costs like a CLIP image tower);
- the metric math for a 30-story, 12-shot benchmark (pure numpy; should be milliseconds).

`python -m bench.bench_eval [--size tiny|full] [--device cpu|cuda] [--repeats N]
[--batch N] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.json_results import write_json_results


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_viclip(size: str, device: str, repeats: int, batch: int) -> dict:
    import torch

    from storymem_model.evaluation import video_encoders as ve

    if size == "full":
        model = ve.ViCLIPModel(ve.ViCLIPConfig()).init_random(0)
        encoder = ve.ViCLIPEncoder(model, name="viclip:full-random", device=device,
                                   batch_size=batch)
    else:
        encoder = ve.tiny_viclip_encoder(device=device, batch_size=batch)
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (81, 480, 832, 3), dtype=np.uint8) for _ in range(batch)]

    def run():
        encoder.embed_videos(videos)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    seconds = _median_seconds(run, repeats)
    texts = _median_seconds(lambda: encoder.embed_texts(["a girl flies a red kite"] * batch),
                            repeats)
    return {"encoder": encoder.name, "device": str(encoder.device), "videos": batch,
            "seconds_per_video": seconds / batch, "videos_per_second": batch / seconds,
            "seconds_per_text": texts / batch}


def bench_decode_and_aesthetic(repeats: int) -> dict:
    from storymem_model.scorers import AestheticScorer
    from storymem_model.video_io import decode_mp4, encode_mp4

    rng = np.random.default_rng(1)
    data = encode_mp4(rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8), 16)
    scorer = AestheticScorer.tiny()
    decode = _median_seconds(lambda: decode_mp4(data), repeats)
    frames = decode_mp4(data)
    score = _median_seconds(lambda: scorer.score_images(frames), repeats)
    return {"frames": int(frames.shape[0]), "decode_seconds": decode,
            "aesthetic_seconds": score, "aesthetic_scorer": scorer.name}


def bench_metrics(repeats: int, stories: int = 30, shots: int = 12, dim: int = 768) -> dict:
    from storymem_model.evaluation import metrics

    rng = np.random.default_rng(2)
    data = [(rng.normal(size=(shots, dim)), rng.normal(size=(shots, dim))) for _ in range(stories)]

    def run():
        rows = []
        for videos, texts in data:
            row = metrics.story_consistency(videos)
            row["single"] = float(metrics.prompt_following(videos, texts).mean())
            rows.append(row)
        metrics.benchmark_mean(r["consistency_all_pairs"] for r in rows)

    return {"stories": stories, "shots": shots, "seconds": _median_seconds(run, repeats)}


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(prog="bench_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv if argv is not None else [])
    size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = {
        "viclip": bench_viclip(size, args.device, args.repeats, args.batch),
        "decode_and_aesthetic": bench_decode_and_aesthetic(args.repeats),
        "metrics": bench_metrics(args.repeats),
    }
    v, d, m = results["viclip"], results["decode_and_aesthetic"], results["metrics"]
    print(f"{v['encoder']} on {v['device']}: {v['seconds_per_video'] * 1000:.1f} ms/video "
          f"({v['videos_per_second']:.2f} videos/s, 81x480x832 in, 8 frames sampled), "
          f"{v['seconds_per_text'] * 1000:.1f} ms/text")
    print(f"decode {d['frames']} frames: {d['decode_seconds'] * 1000:.1f} ms; "
          f"{d['aesthetic_scorer']}: {d['aesthetic_seconds'] * 1000:.1f} ms")
    print(f"metrics for {m['stories']} stories x {m['shots']} shots: {m['seconds'] * 1000:.1f} ms")
    write_json_results(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
