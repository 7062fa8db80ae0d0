"""The cost of a shot, measured: one Wan2.2 A14B expert forward at 480p, with 0 and 10
memory frames, bf16 vs fp8 weights, each available attention backend.

The full-size expert architecture (dim 5120, 40 layers, 40 heads, FFN 13824, 36 input
channels) is built with random weights on the device - nothing is downloaded; a forward's
cost does not depend on the weight values. Inputs are a 480x832 81-frame shot (21 latent
frames of 60x104, 32,760 tokens) plus M memory latent frames (M=10: 48,360 tokens) at the
StoryMem RoPE positions, and 512 text tokens.

Reported per configuration: seconds per evaluation (batch 1; guidance doubles the batch),
the evaluation's FLOP count (from the layer shapes: `forward_flops`), achieved TFLOP/s and
the share of the device's peak, peak memory, and the denoising time of a standard shot (40
steps x 2 evaluations) and of a `fast` shot (4 steps x 1). VAE and text encoding are not
included (seconds per shot, small against the expert on real sizes).

    python -m bench.bench_gpu                     # full size; needs a CUDA GPU (~30 GB+)
    python -m bench.bench_gpu --size tiny         # the tiny expert on the CPU: a smoke run
    python -m bench.bench_gpu --json bench/results/gpu-<device>.json

Results for a GPU go to bench/results/gpu-<device>.json (committed with the device name).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from bench.json_results import write_json_results

# Wan2.2 A14B expert (one of the two; both have this architecture).
A14B = dict(num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
            patch_size=(1, 2, 2))
SHOT_480P = dict(latent_frames=21, latent_height=60, latent_width=104, text_tokens=512)
STANDARD_EVALUATIONS = 40 * 2  # 40 steps with classifier-free guidance
FAST_EVALUATIONS = 4  # the `fast` preset: 4 guidance-free steps
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def expert_and_shot(size: str) -> tuple[dict, dict]:
    """The expert architecture and shot of a benchmark size: "a14b" (Wan2.2 A14B at 480p) or
    "tiny" (the tiny preset's expert on a small shot, for a CPU smoke run)."""
    if size == "a14b":
        return A14B, SHOT_480P
    from storymem_model.presets import TINY

    config = dict(A14B, num_attention_heads=TINY.num_attention_heads,
                  attention_head_dim=TINY.attention_head_dim, ffn_dim=TINY.ffn_dim,
                  num_layers=TINY.num_layers, text_dim=TINY.text_dim, freq_dim=TINY.freq_dim)
    return config, dict(latent_frames=5, latent_height=8, latent_width=8, text_tokens=16)


def skipped_without_gpu(bench: str, json_path: str | None, note: str = "") -> dict:
    """The result of a full-size benchmark on a machine without CUDA: said and written."""
    print(f"{bench}: the full-size expert needs a CUDA GPU; nothing measured{note}")
    report = {"skipped": "no CUDA GPU"}
    write_json_results(json_path, report, indent=1)
    return report


@dataclass
class Measurement:
    memory_frames: int
    weights: str  # bf16 | fp8
    attention_backend: str
    tokens: int
    seconds_per_evaluation: float
    flops_per_evaluation: float
    achieved_tflops: float
    peak_fraction: float | None
    peak_memory_gib: float | None
    standard_shot_denoise_s: float
    fast_shot_denoise_s: float


def forward_flops(config: dict, tokens: int, text_tokens: int) -> float:
    """FLOPs of one expert forward for one batch item (matmuls; 2 per multiply-add).

    Per block: self-attention projections 8 N d^2, attention 4 N^2 d, cross-attention
    projections 4 N d^2 + 4 L d^2 and attention 4 N L d, feed-forward 4 N d F."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, length, ffn = tokens, text_tokens, config["ffn_dim"]
    per_block = (8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * length * d * d
                 + 4 * n * length * d + 4 * n * d * ffn)
    return float(per_block * config["num_layers"])


def build_expert(config: dict, device: torch.device, dtype: torch.dtype):
    """The expert with random weights, made directly on `device` (no host copy)."""
    from diffusers import WanTransformer3DModel

    from storymem_model.rope import install_frame_position_rope

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    install_frame_position_rope(model)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    from storymem_model.model_loading import cast_keeping_fp32_modules

    cast_keeping_fp32_modules(model, dtype)  # as the loader does: norms etc. stay fp32
    return model.eval()


def shot_inputs(config: dict, shot: dict, memory_frames: int, device, dtype):
    from storymem_model.rope import memory_rope_positions

    frames = shot["latent_frames"] + memory_frames
    hidden = torch.randn(1, config["in_channels"], frames, shot["latent_height"],
                         shot["latent_width"], device=device, dtype=dtype)
    text = torch.randn(1, shot["text_tokens"], config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([900.0], device=device)
    positions = memory_rope_positions(memory_frames, shot["latent_frames"], 5)
    p_t, p_h, p_w = config["patch_size"]
    tokens = frames // p_t * (shot["latent_height"] // p_h) * (shot["latent_width"] // p_w)
    return hidden, text, timestep, positions, tokens


def time_forward(model, inputs, repeats: int, device) -> float:
    from storymem_model.rope import frame_positions

    hidden, text, timestep, positions, _ = inputs

    def once():
        with torch.no_grad(), frame_positions(model, positions):
            model(hidden, timestep, text, return_dict=False)

    once()  # warm-up (kernels, caches)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def available_backends(device: torch.device) -> list[str]:
    from storymem_model.acceleration import AccelerationError, check_attention_backend

    backends = []
    for name in ("native", "flash", "sage"):
        try:
            check_attention_backend(name, device)
            backends.append(name)
        except AccelerationError:
            continue
    return backends


def device_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, peak


def measure(model, config, shot, memory_frames, weights, backend, repeats, device, dtype,
            peak_tflops) -> Measurement:
    inputs = shot_inputs(config, shot, memory_frames, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_forward(model, inputs, repeats, device)
    flops = forward_flops(config, inputs[-1], shot["text_tokens"])
    achieved = flops / seconds / 1e12
    peak_memory = (torch.cuda.max_memory_allocated(device) / 2**30
                   if device.type == "cuda" else None)
    return Measurement(memory_frames, weights, backend, inputs[-1], seconds, flops, achieved,
                       achieved / peak_tflops if peak_tflops else None, peak_memory,
                       STANDARD_EVALUATIONS * seconds, FAST_EVALUATIONS * seconds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["a14b", "tiny"], default="a14b",
                        help="a14b: the real expert at 480p (GPU); tiny: a smoke run")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-frames", type=int, nargs="+", default=[0, 10])
    parser.add_argument("--no-fp8", action="store_true", help="skip the fp8-weights runs")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv if argv is not None else [])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.size == "a14b" and device.type != "cuda":
        return skipped_without_gpu("bench_gpu", args.json,
                                   " (about 30 GB; use --size tiny for a CPU smoke run)")
    config, shot = expert_and_shot(args.size)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    device_name, peak = device_peak(device)
    model = build_expert(config, device, dtype)
    results = []
    weight_modes = ["bf16" if dtype == torch.bfloat16 else "fp32"]
    for weights in weight_modes + ([] if args.no_fp8 else ["fp8"]):
        if weights == "fp8":
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                           compute_dtype=dtype)
        for backend in available_backends(device):
            model.set_attention_backend(backend)
            for memory_frames in args.memory_frames:
                m = measure(model, config, shot, memory_frames, weights, backend,
                            args.repeats, device, dtype, peak)
                results.append(m)
                print(f"{weights:4s} {backend:6s} M={memory_frames:2d} tokens={m.tokens:6d}: "
                      f"{m.seconds_per_evaluation:8.4f} s/eval, "
                      f"{m.flops_per_evaluation / 1e15:6.3f} PFLOP, "
                      f"{m.achieved_tflops:8.4g} TFLOP/s"
                      + (f" ({100 * m.peak_fraction:.0f}% of {peak:g})" if peak else "")
                      + (f", peak {m.peak_memory_gib:.1f} GiB" if m.peak_memory_gib else "")
                      + f"; standard shot {m.standard_shot_denoise_s:.1f} s, fast shot "
                        f"{m.fast_shot_denoise_s:.1f} s", flush=True)
    report = {"device": device_name, "peak_bf16_tflops": peak, "size": args.size,
              "config": config, "shot": shot, "torch": torch.__version__,
              "measurements": [asdict(m) for m in results]}
    write_json_results(args.json, report, indent=1)
    if args.json:
        print(f"results written to {args.json}")
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
