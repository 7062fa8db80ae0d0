"""`storymem render`, and the model/scorer/config flags every other command reuses.

Other commands call `add_model_arguments(parser)` and then `pipeline_from_args(args)`,
`scorers_from_args(args)`, `config_from_args(args, pipeline, scorers)` and
`references_from_args(args)`, so every command takes the same flags with the same meaning.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from flows.cli.cli_logging import setup_cli_logging
from storymem_model.render_config import TRANSITIONS, RenderConfig

log = logging.getLogger("storymem.render")

DTYPES = ("float32", "bfloat16", "float16")


class ArgumentsError(ValueError):
    """Flags that cannot work together or name something unusable (exit status 2)."""


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
    model.add_argument("--t2v-model-dir", metavar="DIR",
                       help="Wan2.2-T2V-A14B folder; when given, the first shot of a story "
                            "without --references is plain text-to-video (as the paper)")
    model.add_argument("--lora-dir", metavar="DIR",
                       help="StoryMem LoRA folder with backbone_high_noise.{pth,safetensors} "
                            "and backbone_low_noise.* (the MI2V or MM2V release)")
    model.add_argument("--device", metavar="DEV",
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if "
                            "available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES,
                       help="weights/compute dtype (default: bfloat16 on GPU, float32 on CPU)")

    scorers = parser.add_argument_group(
        "keyframe scorers", "CLIP for similarity and a quality gate (LAION aesthetic "
        "predictor). With --preset tiny the tiny random scorers are used unless CLIP paths "
        "are given.")
    scorers.add_argument("--clip-checkpoint", metavar="FILE",
                         help="open_clip weights file for keyframe similarity (ViT-B/32)")
    scorers.add_argument("--clip-model", default="ViT-B-32-quickgelu",
                         help="open_clip model name of --clip-checkpoint (default: %(default)s)")
    scorers.add_argument("--aesthetic-head", metavar="FILE",
                         help="LAION aesthetic predictor head weights (the quality gate)")
    scorers.add_argument("--aesthetic-clip-checkpoint", metavar="FILE",
                         help="open_clip ViT-L/14 weights the aesthetic head runs on")
    scorers.add_argument("--gate-threshold", type=float, metavar="X",
                         help="a frame becomes a keyframe only with gate score >= X "
                              "(default: the scorer's documented threshold)")

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
                        help="negative RoPE gap S between memory frames and the shot; 0 = "
                             "contiguous positions like the December reference "
                             "(default %(default)s)")
    method.add_argument("--no-memory", dest="memory", action="store_false", default=True,
                        help="render every shot on its own (the paper's independent-shots "
                             "baseline): no memory, no transitions (implies --transition "
                             "none), no keyframes; T2V when the model has T2V experts, else "
                             "M2V with an empty memory")
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

    sampling = parser.add_argument_group(
        "sampling overrides", "Unset flags keep the model's defaults (real: 40 steps, "
        "guidance 3.5, shift 4.0; tiny: see storymem_model/presets.py). T2V shots keep the "
        "T2V defaults (shift 12.0, boundary 0.875, guidance 4.0/3.0) and take only --steps, "
        "--cfg-mode and --reference-sigmas from these flags.")
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


def pipeline_from_args(args: argparse.Namespace):
    """Load the pipeline the flags name (tiny preset or local folders)."""
    from storymem_model import load_pipeline

    if args.preset:
        source = args.preset
    elif args.model_dir:
        source = args.model_dir
    else:
        raise ArgumentsError("give --preset tiny or --model-dir DIR (see --help)")
    kwargs = {}
    if args.t2v_model_dir:
        kwargs["t2v"] = args.t2v_model_dir
    return load_pipeline(source, lora=args.lora_dir, device=args.device, dtype=args.dtype,
                         **kwargs)


def scorers_from_args(args: argparse.Namespace):
    """Build the keyframe scorers the flags name."""
    from storymem_model.scorers import ScorerPaths, build_scorers

    if args.clip_checkpoint:
        paths = ScorerPaths(clip_checkpoint=args.clip_checkpoint,
                            aesthetic_head=args.aesthetic_head,
                            aesthetic_clip_checkpoint=args.aesthetic_clip_checkpoint,
                            clip_model=args.clip_model)
        return build_scorers(paths, gate_threshold=args.gate_threshold, device=args.device)
    if args.preset == "tiny":
        return build_scorers("tiny", gate_threshold=args.gate_threshold)
    raise ArgumentsError("real models need real keyframe scorers: give --clip-checkpoint, "
                         "--aesthetic-head and --aesthetic-clip-checkpoint")


def references_from_args(args: argparse.Namespace) -> list:
    """The --references images as (H, W, 3) uint8 arrays, in the order given."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from storymem_model import storage

    images = []
    for uri in args.references or []:
        try:
            import io

            with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
                images.append(np.asarray(img.convert("RGB")).copy())
        except FileNotFoundError:
            raise ArgumentsError(f"reference image {uri} not found") from None
        except (UnidentifiedImageError, OSError, storage.StorageError) as exc:
            raise ArgumentsError(f"reference image {uri} cannot be read: {exc}") from None
    return images


def config_from_args(args: argparse.Namespace, pipeline, scorers=None,
                     references: list | None = None) -> RenderConfig:
    """The RenderConfig for these flags, filled from the loaded pipeline and scorers."""
    from storymem_model.runner import images_sha256

    sampling = {key: getattr(args, key) for key in (
        "num_inference_steps", "guidance_scale", "guidance_scale_2", "shift",
        "boundary_ratio", "cfg_mode", "reference_sigmas") if getattr(args, key) is not None}
    if references is None:
        references = references_from_args(args)
    extra = {}
    memory = getattr(args, "memory", True)
    if memory is False:
        extra.update(memory=False, transition="none")  # no transitions without memory
        if references:
            raise ArgumentsError("--no-memory renders every shot without memory; it cannot "
                                 "use --references (the initial memory)")
    if getattr(args, "t2v_model_dir", None):
        from pathlib import Path

        extra["t2v_model_id"] = str(Path(args.t2v_model_dir).resolve())
    extra.setdefault("transition", args.transition)
    return RenderConfig.for_pipeline(
        pipeline, scorers, sampling=sampling, seed=args.seed,
        max_memory=args.max_memory, memory_sink=args.memory_sink,
        rope_shift=args.rope_shift or None, prompt_aware_memory=args.prompt_aware_memory,
        negative_prompt=args.negative_prompt, keyframe_threshold=args.keyframe_threshold,
        max_keyframes=args.max_keyframes, height=args.height, width=args.width,
        num_frames=args.num_frames, references_sha256=images_sha256(references), **extra)


# ---------------------------------------------------------------------------------------
def add_render_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "render", help="render story scripts into multi-shot videos",
        description="Render story scripts (ST-Bench JSON/JSON5 or a JSON list of prompts) "
        "shot by shot with StoryMem memory. Each story's files go to "
        "OUT/{story_id}/{config_hash}/: shots/*.mp4, keyframes/, memory/, {story_id}.mp4, "
        "shots.parquet and _COMMITTED.json (written last). Running the same command again "
        "skips committed stories and resumes interrupted ones from their first unfinished "
        "shot. Exit status 1 when any story fails (the others still render), 2 for bad "
        "flags.")
    parser.add_argument("scripts", nargs="+", metavar="SCRIPT",
                        help="story script files (local paths or s3:// URIs)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or fsspec URI (e.g. ./outputs, s3://bucket/prefix)")
    parser.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                        help="progress bars on a terminal and log lines otherwise (auto, "
                             "the default), always bars, log lines, or nothing")
    add_model_arguments(parser)
    hps = parser.add_argument_group(
        "HPSv3 gate", "Gate keyframes with HPSv3 (score >= 3.0) as the reference does, instead "
        "of the aesthetic predictor. Runs in the separate environment built by `make hps-env`.")
    hps.add_argument("--hps-checkpoint", metavar="FILE", help="HPSv3 checkpoint file")
    hps.add_argument("--hps-base-model", metavar="DIR", help="Qwen2-VL base model folder")
    hps.add_argument("--hps-python", metavar="PATH",
                     help="python of the HPS environment (default: .hps-venv/bin/python)")
    parser.set_defaults(func=run_render)
    return parser


def run_render(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from storymem_model import storage
    from storymem_model.runner import RenderError, StoryRunner
    from storymem_model.story_script import ScriptError, load_script

    setup_cli_logging()
    if not args.preset and not args.model_dir:
        print("storymem render: error: give --preset tiny or --model-dir DIR", file=sys.stderr)
        return 2
    # Validate every script before any model work; bad scripts are reported, not fatal.
    failures: list[tuple[str, str]] = []
    scripts = []
    for uri in args.scripts:
        try:
            scripts.append(load_script(uri))
        except ScriptError as exc:
            failures.append((uri, str(exc)))
            log.error("%s", exc)
    results = []
    if scripts:
        started = time.perf_counter()
        try:
            storage.filesystem(args.out)
            references = references_from_args(args)
            _check_config_flags(args, references)  # seconds, before minutes of model loading
            pipeline = pipeline_from_args(args)
            scorers = _with_hps_gate(args, scorers_from_args(args))
            config = config_from_args(args, pipeline, scorers, references)
        except (ValueError, storage.StorageError) as exc:  # flags, model, LoRA, scorer paths
            print(f"storymem render: error: {exc}", file=sys.stderr)
            return 2
        runner = StoryRunner(pipeline, scorers, config, references=references)
        log.info("model %s ready in %.1f s; config %s", config.model_id,
                 time.perf_counter() - started, config.config_hash())
        progress = {"auto": None, "bar": True, "log": _LogOnly(), "none": False}[args.progress]
        use_bar = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
        stories = tqdm(scripts, unit="story", desc="stories", disable=not use_bar)
        for script in stories:
            try:
                result = runner.render(script, args.out, progress=progress)
            except (RenderError, storage.StorageError) as exc:  # expected: no traceback
                log.error("story %s (%s) failed: %s", script.story_id, script.source, exc)
                failures.append((script.source, f"{type(exc).__name__}: {exc}"))
                continue
            except Exception as exc:  # one story failing never stops the others
                log.exception("story %s (%s) failed", script.story_id, script.source)
                failures.append((script.source, f"{type(exc).__name__}: {exc}"))
                continue
            results.append(result)
            log.info("story %s %s: %s and %s", script.story_id, result.status,
                     result.video_uri, result.parquet_uri)
    _print_summary(results, failures)
    return 1 if failures else 0


def _check_config_flags(args: argparse.Namespace, references: list | None = None) -> None:
    """Raise ConfigError for unusable setting values, with the model's usual defaults
    standing in for the loaded pipeline."""
    from types import SimpleNamespace

    from storymem_model.presets import REAL_SHOT, TINY

    shot = TINY.shot if args.preset == "tiny" else REAL_SHOT
    stand_in = SimpleNamespace(
        model_id="(not loaded yet)", default_height=shot.height, default_width=shot.width,
        default_num_frames=shot.num_frames, fps=shot.fps, default_sampling={})
    config_from_args(args, stand_in, None, references=list(references or []))


def _with_hps_gate(args: argparse.Namespace, scorers):
    """The scorers with HPSv3 as the gate when --hps-checkpoint is given."""
    if not (args.hps_checkpoint or args.hps_base_model):
        return scorers
    if not (args.hps_checkpoint and args.hps_base_model):
        raise ArgumentsError("the HPSv3 gate needs both --hps-checkpoint and --hps-base-model")
    from storymem_model.scorers import KeyframeScorers
    from storymem_model.scorers.hps_scorer import HPSScorer

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    gate = HPSScorer(args.hps_checkpoint, args.hps_base_model, python=args.hps_python,
                     device=device)
    threshold = args.gate_threshold if args.gate_threshold is not None \
        else gate.default_threshold
    return KeyframeScorers(embedder=scorers.embedder, gate=gate, gate_threshold=threshold)


class _LogOnly:
    """Progress callback writing one log line per finished shot (--progress log)."""

    def __call__(self, event: dict) -> None:
        log.info("story %s: shot %d/%d (scene %d shot %d, %s) done in %.1f s",
                 event["story_id"], event["shot_index"] + 1, event["shots_total"],
                 event["scene"], event["shot"], event["mode"], event["seconds"])


def _print_summary(results, failures) -> None:
    out = sys.stdout
    for result in results:
        print(f"{result.status:9s} {result.story_id}: {result.shots_total} shots "
              f"({result.shots_rendered} rendered now) in {result.seconds:.1f} s", file=out)
        print(f"          video   {result.video_uri}", file=out)
        print(f"          parquet {result.parquet_uri}", file=out)
    if failures:
        print(f"{len(failures)} of {len(results) + len(failures)} stories FAILED:", file=out)
        for source, reason in failures:
            first = reason.splitlines()
            print(f"  {source}: {first[0]}", file=out)
            for line in first[1:]:
                print(f"    {line}", file=out)
    else:
        print(f"all {len(results)} stories done", file=out)
