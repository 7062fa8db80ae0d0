"""bench/bench_gpu.py: the FLOP count of an A14B forward and a smoke run on the CPU."""
from __future__ import annotations

import json

import pytest

from bench import bench_gpu


def test_forward_flops_match_the_published_cost_of_a_shot():
    # docs/method.md#cost-of-a-shot: ~1.68 PFLOP without memory, ~3.09 with 10 frames
    assert bench_gpu.forward_flops(bench_gpu.A14B, 32_760, 512) == pytest.approx(1.68e15,
                                                                                 rel=0.01)
    assert bench_gpu.forward_flops(bench_gpu.A14B, 48_360, 512) == pytest.approx(3.09e15,
                                                                                 rel=0.01)
    inputs = bench_gpu.shot_inputs(bench_gpu.A14B, bench_gpu.SHOT_480P, 10, "meta", None)
    assert inputs[-1] == 48_360


def test_smoke_run_on_the_cpu(tmp_path):
    path = tmp_path / "gpu.json"
    report = bench_gpu.main(["--size", "tiny", "--repeats", "1", "--device", "cpu",
                             "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["size"] == "tiny" and len(saved["measurements"]) == 4  # 2 memory x 2 weights
    for row in saved["measurements"]:
        assert row["seconds_per_evaluation"] > 0 and row["flops_per_evaluation"] > 0
        assert row["standard_shot_denoise_s"] == pytest.approx(
            80 * row["seconds_per_evaluation"])
        assert row["fast_shot_denoise_s"] == pytest.approx(4 * row["seconds_per_evaluation"])
    assert {r["weights"] for r in saved["measurements"]} == {"fp32", "fp8"}
    assert report["measurements"] == saved["measurements"]
    assert bench_gpu.main(["--device", "cpu"]) == {"skipped": "no CUDA GPU"}
