"""bench/bench_train.py: the single-process training step (the code the A14B measurement
runs) as a CPU smoke run with the tiny expert, and the GPU-less skip."""
from __future__ import annotations

import json

from bench import bench_train


def test_tiny_step_smoke_run_on_the_cpu(tmp_path):
    path = tmp_path / "train.json"
    report = bench_train.main(["--size", "tiny-step", "--device", "cpu", "--repeats", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["seconds_per_step"] == report["seconds_per_step"] and saved["size"] == "tiny-step"
    assert saved["seconds_per_step"] > 0 and saved["flops_per_step"] > 0
    assert saved["tokens"] == (5 + bench_train.MEMORY_LATENTS) * 4 * 4
    # r 8 on 2 blocks: 8 attention linears 32 -> 32 (8 x 32 + 32 x 8 each) and the FFN's
    # 32 -> 64 and 64 -> 32 (8 x 32 + 64 x 8, 8 x 64 + 32 x 8)
    assert saved["lora_parameters"] == 2 * (8 * 512 + 2 * 768)


def test_the_full_size_step_needs_a_gpu():
    assert bench_train.main(["--size", "a14b", "--device", "cpu"]) == {"skipped": "no CUDA GPU"}
