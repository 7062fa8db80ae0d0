"""The model, scorer and render flags every command shares, and the specs they become.

`add_model_arguments(parser)` adds the flags; `specs_from_args(args)` turns them into the
typed specs (`ModelSpec`, `ScorerSpec` or None, `RenderSettings`) and
`render_spec_from_args(args, accelerator=...)` resolves those into the `RenderSpec` every
host renders with - without loading weights. This is the only place flags become specs;
nothing below the command line sees an argparse Namespace.
"""
from __future__ import annotations

import argparse

from storymem_model.spec_json import SpecError
from storymem_model.specs import (DTYPES, TRANSITIONS, ModelSpec, RenderSettings,
                                  SamplingOverrides, ScorerSpec)

SAMPLING_FLAGS = ("num_inference_steps", "guidance_scale", "guidance_scale_2", "shift",
                  "boundary_ratio", "cfg_mode", "reference_sigmas", "solver", "step_list")


class ArgumentsError(ValueError):
    """Flags that cannot work together or name something unusable (exit status 2)."""


def _step_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1000,750,500,250, got {text!r}")
    if not steps:
        raise argparse.ArgumentTypeError("the step list is empty")
    return steps


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the model, the scorers and every setting that changes pixels."""
    model = parser.add_argument_group(
        "model", "Either --preset tiny (random tiny weights, for tests and the demo) or "
        "local Wan2.2 folders (nothing is ever downloaded).")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=["tiny"],
                        help="build the real architectures at tiny sizes with seeded random "
                             "weights (videos are noise; runs on a CPU)")
    source.add_argument("--model-dir", metavar="DIR",
                        help="Wan2.2-I2V-A14B in diffusers layout (Wan2.2-I2V-A14B-Diffusers) "
                             "or the original Wan2.2 layout")
    model.add_argument("--components-dir", metavar="DIR",
                       help="with an original-layout --model-dir: the diffusers-layout "
                            "folder that supplies the VAE, text encoder and tokenizer")
    model.add_argument("--t2v-model-dir", metavar="DIR",
                       help="Wan2.2-T2V-A14B folder; when given, the first shot of a story "
                            "without --references is plain text-to-video (as the paper)")
    model.add_argument("--lora-dir", metavar="DIR",
                       help="StoryMem LoRA folder with backbone_high_noise.{pth,safetensors} "
                            "and backbone_low_noise.* (the MI2V or MM2V release, or one made "
                            "by `storymem train`)")
    model.add_argument("--lora-strength", type=float, default=1.0,
                       help="multiplies the LoRA's rsLoRA scale (default %(default)s)")
    model.add_argument("--device", metavar="DEV",
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if "
                            "available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES,
                       help="weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    model.add_argument("--offload", choices=["model", "sequential", "group"],
                       help="move weights between CPU and GPU as they are used (small GPUs): "
                            "whole components, layer by layer, or block groups with CUDA "
                            "streams (24-48 GB GPUs)")
    model.add_argument("--distill-lora-dir", metavar="DIR",
                       help="a step-distillation LoRA pair for the two Wan2.2 I2V-A14B "
                            "experts (one file named *high*, one *low*: the Lightning / "
                            "LightX2V releases), stacked on the StoryMem LoRA; use with "
                            "--sampling fast")
    model.add_argument("--distill-lora-strength", type=float, default=1.0,
                       help="multiplies the distillation LoRA's scale (default %(default)s)")
    model.add_argument("--storage-dtype", choices=["fp8", "float8_e4m3fn", "float8_e5m2"],
                       help="keep transformer weights in fp8 and compute in --dtype "
                            "(diffusers layerwise casting; halves weight memory vs bf16)")
    model.add_argument("--attention-backend", choices=["native", "flash", "sage"],
                       default="native",
                       help="attention kernels through diffusers' dispatcher: native (PyTorch "
                            "SDPA), flash (flash-attn) or sage (SageAttention); the last two "
                            "need their package and a CUDA GPU (default %(default)s)")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the transformer blocks (regional compilation; the "
                            "first shot pays the compile time)")

    scorers = parser.add_argument_group(
        "keyframe scorers", "CLIP for similarity and a quality gate (the LAION aesthetic "
        "predictor, or HPSv3 as the reference). With --preset tiny the tiny random scorers "
        "are used unless CLIP paths are given. Not needed with --no-memory.")
    scorers.add_argument("--clip-checkpoint", metavar="FILE",
                         help="open_clip weights file for keyframe similarity (ViT-B/32)")
    scorers.add_argument("--clip-model", default="ViT-B-32-quickgelu",
                         help="open_clip model name of --clip-checkpoint (default: %(default)s)")
    scorers.add_argument("--aesthetic-head", metavar="FILE",
                         help="LAION aesthetic predictor head weights (the quality gate)")
    scorers.add_argument("--aesthetic-clip-checkpoint", metavar="FILE",
                         help="open_clip ViT-L/14 weights the aesthetic head runs on")
    scorers.add_argument("--hps-checkpoint", metavar="FILE",
                         help="gate keyframes with HPSv3 (score >= 3.0, as the reference) "
                              "instead of the aesthetic predictor: the HPSv3 checkpoint; "
                              "runs in the environment built by `make hps-env`")
    scorers.add_argument("--hps-base-model", metavar="DIR",
                         help="the Qwen2-VL folder HPSv3 is built on")
    scorers.add_argument("--hps-python", metavar="PATH",
                         help="python of the HPS environment (default: .hps-venv/bin/python)")
    scorers.add_argument("--gate-threshold", type=float, metavar="X",
                         help="a frame becomes a keyframe only with gate score >= X "
                              "(default: the gate's documented threshold)")
    scorers.add_argument("--keyframe-preprocess", choices=["reference", "direct"],
                         default="reference",
                         help="how the scorers see a shot's frames: reference (as the "
                              "reference release: Qwen2-VL smart resize, then CLIP squashes "
                              "bilinear) or direct (each scorer resizes full frames); default "
                              "%(default)s")

    method = parser.add_argument_group("StoryMem method")
    method.add_argument("--transition", choices=TRANSITIONS, default="mi2v",
                        help="how shots with cut=false continue the previous shot: mi2v "
                             "(its last frame), mm2v (its last 5 frames) or none (plain M2V); "
                             "default %(default)s. Match the LoRA you load.")
    method.add_argument("--references", nargs="+", metavar="IMG", default=[],
                        help="reference images (e.g. the characters) used as the initial "
                             "memory: the first shot is then MR2V instead of T2V")
    method.add_argument("--seed", type=int, default=0,
                        help="story seed; each shot gets its own seed from it (default 0)")
    method.add_argument("--max-memory", type=int, default=10,
                        help="memory bank size in keyframes (default %(default)s, as trained)")
    method.add_argument("--memory-sink", type=int, default=3,
                        help="the first N keyframes of a story are always kept "
                             "(default %(default)s)")
    method.add_argument("--rope-shift", type=int, default=5, metavar="S",
                        help="negative RoPE gap S between memory frames and the shot: the "
                             "authors' January 2026 release uses S=5; 0 = contiguous "
                             "positions like the December reference (default %(default)s)")
    method.add_argument("--no-memory", dest="memory", action="store_false", default=True,
                        help="render every shot on its own (the paper's independent-shots "
                             "baseline): no memory, no transitions (implies --transition "
                             "none), no keyframes and no keyframe scorers; T2V when the model "
                             "has T2V experts, else M2V with an empty memory")
    method.add_argument("--prompt-aware-memory", action="store_true",
                        help="condition each shot on the memory entries closest to its "
                             "prompt instead of the whole bank")
    method.add_argument("--negative-prompt", metavar="TEXT",
                        help="negative prompt (default: Wan's standard one)")
    method.add_argument("--keyframe-threshold", type=float, default=0.9,
                        help="CLIP similarity below which a frame is a new keyframe "
                             "(default %(default)s)")
    method.add_argument("--max-keyframes", type=int, default=3,
                        help="keyframes kept per shot at most (default %(default)s)")
    method.add_argument("--fix-mem", type=int, metavar="N",
                        help="memory frames after the first N get mask value 2 (the "
                             "reference's optional fix_mem; default: off, every memory frame 1)")

    sampling = parser.add_argument_group(
        "sampling overrides", "Unset flags keep the model's defaults (real: 40 steps, "
        "guidance 3.5, shift 4.0; tiny: see storymem_model/presets.py). T2V shots keep the "
        "T2V defaults (shift 12.0, boundary 0.875) and take only --steps, --cfg-mode and "
        "--reference-sigmas from these flags.")
    sampling.add_argument("--sampling", choices=["standard", "fast"], default="standard",
                          dest="sampling_preset",
                          help="standard: the reference (40 steps, guidance 3.5, UniPC); "
                               "fast: 4 guidance-free Euler steps at 1000/750/500/250 with "
                               "shift 5 for a step-distillation LoRA (--distill-lora-dir); "
                               "default %(default)s. T2V first shots keep their own sampling")
    sampling.add_argument("--step-list", type=_step_list, metavar="T1,T2,...",
                          help="explicit timesteps on the 0..1000 grid before the shift, "
                               "strictly decreasing (e.g. 1000,750,500,250)")
    sampling.add_argument("--solver", choices=["unipc", "euler"],
                          help="flow-matching solver (default: the preset's)")
    sampling.add_argument("--steps", type=int, dest="num_inference_steps",
                          help="denoising steps")
    sampling.add_argument("--guidance-scale", type=float, help="CFG scale, high-noise expert")
    sampling.add_argument("--guidance-scale-2", type=float, help="CFG scale, low-noise expert")
    sampling.add_argument("--shift", type=float, help="flow-matching schedule shift")
    sampling.add_argument("--boundary-ratio", type=float,
                          help="switch from the high- to the low-noise expert at this t/1000")
    sampling.add_argument("--cfg-mode", choices=["batched", "sequential"],
                          help="conditional and unconditional passes in one batch or two")
    sampling.add_argument("--reference-sigmas", action=argparse.BooleanOptionalAction,
                          default=None, help="use the reference release's sigma grid")
    sampling.add_argument("--height", type=int, help="shot height in pixels")
    sampling.add_argument("--width", type=int, help="shot width in pixels")
    sampling.add_argument("--num-frames", type=int,
                          help="frames generated per shot (4k+1; real default 81)")


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    if not args.preset and not args.model_dir:
        raise ArgumentsError("give --preset tiny or --model-dir DIR (see --help)")
    return _spec(ModelSpec, preset=args.preset, model_dir=args.model_dir,
                 components_dir=args.components_dir, t2v_model_dir=args.t2v_model_dir,
                 lora_dir=args.lora_dir, lora_strength=args.lora_strength,
                 distill_lora_dir=args.distill_lora_dir,
                 distill_lora_strength=args.distill_lora_strength,
                 device=args.device, dtype=args.dtype, offload=args.offload,
                 storage_dtype=args.storage_dtype, attention_backend=args.attention_backend,
                 compile=args.compile)


def scorer_spec_from_args(args: argparse.Namespace, *, required: bool = False
                          ) -> ScorerSpec | None:
    """The keyframe scorers the flags name; None without memory (nothing is selected)
    unless `required` (the CLIP also embeds a dataset's keyframes, training's clips)."""
    if not args.memory and not required:
        return None
    if not args.clip_checkpoint and args.preset != "tiny":
        raise ArgumentsError("real models need real keyframe scorers: give --clip-checkpoint "
                             "and a gate (--aesthetic-head and --aesthetic-clip-checkpoint, "
                             "or --hps-checkpoint and --hps-base-model); --no-memory needs "
                             "none")
    spec = _spec(ScorerSpec, preset=None if args.clip_checkpoint else args.preset,
                 clip_checkpoint=args.clip_checkpoint, clip_model=args.clip_model,
                 aesthetic_head=args.aesthetic_head,
                 aesthetic_clip_checkpoint=args.aesthetic_clip_checkpoint,
                 hps_checkpoint=args.hps_checkpoint, hps_base_model=args.hps_base_model,
                 hps_python=args.hps_python, gate_threshold=args.gate_threshold,
                 keyframe_preprocess=args.keyframe_preprocess, device=args.device)
    problems = spec.problems_for_keyframes()
    if problems:
        raise ArgumentsError("; ".join(problems))
    return spec


def render_settings_from_args(args: argparse.Namespace) -> RenderSettings:
    if not args.memory and args.references:
        raise ArgumentsError("--no-memory renders every shot without memory; it cannot use "
                             "--references (the initial memory)")
    sampling = _spec(SamplingOverrides, **{k: getattr(args, k) for k in SAMPLING_FLAGS})
    return _spec(RenderSettings, transition="none" if not args.memory else args.transition,
                 seed=args.seed, memory=args.memory, max_memory=args.max_memory,
                 memory_sink=args.memory_sink, rope_shift=args.rope_shift or None,
                 prompt_aware_memory=args.prompt_aware_memory,
                 negative_prompt=args.negative_prompt,
                 keyframe_threshold=args.keyframe_threshold,
                 max_keyframes=args.max_keyframes, fix_mem=args.fix_mem,
                 sampling_preset=args.sampling_preset, sampling=sampling, height=args.height,
                 width=args.width, num_frames=args.num_frames,
                 references=tuple(args.references or ()))


def specs_from_args(args: argparse.Namespace
                    ) -> tuple[ModelSpec, ScorerSpec | None, RenderSettings]:
    """(model, scorers, settings) from the flags; ArgumentsError names what is wrong."""
    return model_spec_from_args(args), scorer_spec_from_args(args), \
        render_settings_from_args(args)


def render_spec_from_args(args: argparse.Namespace, *, accelerator: bool):
    """The resolved RenderSpec for these flags (reads file headers, loads no weights).
    `accelerator`: whether the host that renders has a GPU."""
    from storymem_model.model_identity import IdentityError
    from storymem_model.render_spec import ReferenceImageError, resolve_render_spec

    model, scorers, settings = _specs_naming_every_problem(args)
    try:
        return resolve_render_spec(model, scorers, settings, accelerator=accelerator)
    except (SpecError, IdentityError, ReferenceImageError) as exc:
        raise ArgumentsError(str(exc)) from None


def _specs_naming_every_problem(args: argparse.Namespace):
    """`specs_from_args`, but an unusable model folder is named together with missing
    scorer or setting flags (one run of the command shows every problem)."""
    from storymem_model.model_identity import IdentityError, model_identity

    model = model_spec_from_args(args)
    problems = []
    try:
        model_identity(model)
    except IdentityError as exc:
        problems.append(str(exc))
    specs = []
    for build in (scorer_spec_from_args, render_settings_from_args):
        try:
            specs.append(build(args))
        except ArgumentsError as exc:
            problems.append(str(exc))
    if problems:
        raise ArgumentsError("; ".join(problems))
    return model, *specs


def local_accelerator() -> bool:
    """Whether this machine has a GPU (for a render that runs here)."""
    import torch

    return torch.cuda.is_available()


def accelerator_from_args(args: argparse.Namespace) -> bool:
    """Whether a render on this machine runs on a GPU: `--device` says so when given (and
    torch is not even imported), else `local_accelerator()` decides."""
    if args.device:
        return not args.device.startswith("cpu")
    return local_accelerator()


def _spec(cls, **values):
    try:
        return cls(**values)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None
