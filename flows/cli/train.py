"""`storymem train prepare|fit|flow`: make a StoryMem LoRA pair from a studio's own clips.

Every flag becomes a typed spec here, once (`PrepareSpec`, `FitSpec`, `ValidationSpec`),
checked before anything runs (exit status 2 in seconds for unusable flags, data or model;
1 when the work itself fails); the Ray Data
preparation (`pipelines.training.prepare`), the Ray Train fit (`pipelines.training.fit`)
and the Prefect flow (`flows.train_lora`) receive the specs. The model and scorer flags are
the render's (`model_flags.model_spec_from_args`, `scorer_spec_from_args`), the subset
training uses.
"""
from __future__ import annotations

import argparse
import sys

from flows.cli.model_flags import ArgumentsError, model_spec_from_args, scorer_spec_from_args
from storymem_model.spec_json import SpecError

# model_flags' converters read these attributes; training fixes them
FIXED_MODEL_FLAGS = dict(t2v_model_dir=None, lora_dir=None, lora_strength=1.0, distill_lora_dir=None,
                         distill_lora_strength=1.0, offload=None, storage_dtype=None,
                         attention_backend="native", compile=False, memory=True)


def add_train_commands(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a StoryMem M2V LoRA pair on your own clips (Ray Data + Ray Train)",
        description="Make a StoryMem LoRA pair from clips you may use: `prepare` decodes, groups "
        "and encodes the clips on Ray Data, `fit` trains the LoRA of each Wan2.2 expert on Ray "
        "Train, `flow` runs prepare -> fit -> validate -> publish as a Prefect flow. The result "
        "loads with `storymem render --lora-dir OUT/lora`. See docs/training.md.")
    commands = parser.add_subparsers(dest="train_command", metavar="STEP", required=True)

    prepare = commands.add_parser(
        "prepare", help="clips -> sharded latents, caption embeddings and memory candidates",
        description="Decode every clip to the training frames (ffmpeg: --fps, --num-frames, centre "
        "crop and resize to --height x --width), group clips into pseudo-stories (their group_id, "
        "else CLIP similarity), pick each clip's keyframes with the render's keyframe selection, "
        "and write VAE latents, UMT5 caption embeddings and memory candidates to OUT/shards/*.parquet "
        "with OUT/manifest.json; refused clips go to OUT/errors.parquet with their reason. "
        "Running it again skips finished shards (and does nothing when all are done).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=run_prepare_command)

    fit = commands.add_parser(
        "fit", help="prepared data -> OUT/lora/backbone_{high,low}_noise.safetensors",
        description="Train the rsLoRA of the Wan2.2 experts on prepared data with Ray Train "
        "(TorchTrainer; gloo on CPU workers, NCCL on GPU workers; FSDP2 or DDP). Checkpoints "
        "(LoRA, optimiser, step, data position) go to --checkpoints; the same command after a "
        "crash continues from the last one. Writes OUT/lora/ (the released key format), "
        "OUT/metrics.parquet and OUT/training_card.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fit_arguments(fit)
    fit.set_defaults(func=run_fit_command)

    add_train_flow_command(commands, "flow")
    return parser


def add_train_flow_command(subparsers, name: str) -> argparse.ArgumentParser:
    """The train_lora flow's command: `storymem train flow` and `storymem flow train`."""
    flow = subparsers.add_parser(
        name, help="prepare -> fit -> validate -> publish as the Prefect flow `train_lora`",
        description="Run the Prefect flow train_lora once, now: prepare the clips into OUT/prepared, "
        "fit into OUT, render the validation script with the new LoRA, and publish the LoRA pair "
        "and its card to --publish-to. Without PREFECT_API_URL Prefect starts a temporary local "
        "server for the run.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flow.add_argument("--clips", required=True, metavar="URI", help="as for `prepare`")
    flow.add_argument("--out", required=True, metavar="URI",
                      help="the run's folder: OUT/prepared, OUT/lora, OUT/metrics.parquet, ...")
    flow.add_argument("--publish-to", metavar="URI",
                      help="copy the validated LoRA pair and its card here (e.g. a models bucket)")
    _add_shared(flow)
    _add_fit_options(flow)
    flow.set_defaults(func=run_flow_command)
    return flow


# ---------------------------------------------------------------------------------------
# Flags

def _add_model_flags(parser: argparse.ArgumentParser, device: bool = True) -> None:
    model = parser.add_argument_group("model", "--preset tiny, or local Wan2.2 I2V-A14B folders")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=["tiny"], help="the tiny random model (tests, laptops)")
    source.add_argument("--model-dir", metavar="DIR", help="Wan2.2-I2V-A14B (diffusers or original layout)")
    model.add_argument("--components-dir", metavar="DIR",
                       help="with an original-layout --model-dir: the diffusers folder with vae/, "
                            "text_encoder/, tokenizer/")
    if device:
        model.add_argument("--device", metavar="DEV", help="torch device of the encoders (default: the "
                           "worker's GPU when --gpus-per-worker > 0, else cpu)")
    else:  # fit: each Ray Train worker's own device
        parser.set_defaults(device=None)
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.set_defaults(**FIXED_MODEL_FLAGS)


def _add_scorer_flags(parser: argparse.ArgumentParser) -> None:
    scorers = parser.add_argument_group(
        "keyframe scorers", "CLIP (grouping by similarity, keyframe selection) and the quality "
        "gate, as for rendering; --preset tiny uses the tiny scorers unless CLIP files are given")
    scorers.add_argument("--clip-checkpoint", metavar="FILE", help="open_clip ViT-B/32 weights")
    scorers.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip model name")
    scorers.add_argument("--aesthetic-head", metavar="FILE", help="LAION aesthetic predictor head")
    scorers.add_argument("--aesthetic-clip-checkpoint", metavar="FILE", help="its CLIP ViT-L/14 weights")
    scorers.add_argument("--hps-checkpoint", metavar="FILE", help="HPSv3 checkpoint (gate)")
    scorers.add_argument("--hps-base-model", metavar="DIR", help="the Qwen2-VL folder of HPSv3")
    scorers.add_argument("--hps-python", metavar="PATH", help="python of the HPS environment")
    scorers.add_argument("--gate-threshold", type=float, metavar="X", help="keyframe gate threshold")
    scorers.add_argument("--keyframe-preprocess", choices=["reference", "direct"], default="reference",
                         help="how the scorers see frames (as for rendering)")


def _add_cluster_flags(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("Ray")
    group.add_argument("--workers", type=int, default=1, help=f"{what} workers")
    group.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per worker (0: CPU workers)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (fractions allowed)")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="join this Ray cluster (e.g. auto, host:6379); default: an embedded local Ray")


def _add_prepare_options(parser: argparse.ArgumentParser) -> None:
    shot = parser.add_argument_group("training shot")
    shot.add_argument("--height", type=int, help="frame height (default: the model's, 480; tiny 64)")
    shot.add_argument("--width", type=int, help="frame width (default: the model's, 832; tiny 64)")
    shot.add_argument("--num-frames", type=int, help="frames per clip, 4k+1 (default: 81; tiny 17)")
    shot.add_argument("--fps", type=float, default=16.0, help="frames per second clips are resampled to")
    groups = parser.add_argument_group("groups and memory")
    groups.add_argument("--group-threshold", type=float, default=0.9,
                        help="CLIP similarity to join a group (clips without group_id)")
    groups.add_argument("--max-group-size", type=int, default=8, help="clips per group at most")
    groups.add_argument("--memory-candidates", type=int, default=10,
                        help="memory latents kept per clip (from the other clips of its group)")
    groups.add_argument("--memory-sink", type=int, default=3,
                        help="with more candidates: always keep the group's first N, then the most recent")
    groups.add_argument("--keyframe-threshold", type=float, default=0.9, help="as for rendering")
    groups.add_argument("--max-keyframes", type=int, default=3, help="as for rendering")
    data = parser.add_argument_group("data")
    data.add_argument("--rows-per-shard", type=int, default=64, help="clips per shard (whole groups)")
    data.add_argument("--max-clip-mb", type=float, default=1024.0, help="larger clip files are refused")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", required=True, metavar="URI",
                        help="a manifest (.jsonl or .parquet: clip_uri, caption, optional group_id, "
                             "order) or the dataset flow's output folder")
    parser.add_argument("--out", required=True, metavar="URI", help="output folder (local or s3://)")
    _add_shared(parser)


def _add_shared(parser: argparse.ArgumentParser) -> None:
    _add_model_flags(parser)
    _add_scorer_flags(parser)
    _add_prepare_options(parser)
    _add_cluster_flags(parser, "Ray Data / Ray Train")


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("training")
    run.add_argument("--expert", choices=["high", "low", "both"], default="both",
                     help="which expert's LoRA to train (both: high, then low)")
    run.add_argument("--steps", type=int, required=True, help="optimiser steps per expert")
    run.add_argument("--lora-rank", type=int, help="LoRA rank (default: 128; the tiny preset's own)")
    run.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    run.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    run.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    run.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    run.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    run.add_argument("--grad-accum", type=int, default=1,
                     help="micro-steps per step (each: one sample per worker)")
    run.add_argument("--seed", type=int, default=0, help="LoRA init, data order, every draw")
    run.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp",
                     help="FSDP2 sharding of the frozen expert, or DDP replicas")
    run.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                     help="keep every block's activations (faster, more memory)")
    sample = parser.add_argument_group("samples")
    sample.add_argument("--max-memory", type=int, default=10, help="memory latents per sample: 0..N")
    sample.add_argument("--mi2v-prob", type=float, default=0.5, help="share of MI2V samples (first frame given)")
    sample.add_argument("--mm2v-prob", type=float, default=0.0, help="share of MM2V samples (5 frames given)")
    sample.add_argument("--rope-shift", type=int, default=5, help="negative RoPE gap S (0: contiguous)")
    sample.add_argument("--fix-mem", type=int, help="memory frames after the first N get mask 2")
    sample.add_argument("--boundary-ratio", type=float, default=0.9,
                        help="expert split: high noise for t >= ratio x 1000")
    sample.add_argument("--timestep-shift", type=float, default=4.0, help="shift of the training timesteps")
    ckpt = parser.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--checkpoints", metavar="URI", help="Ray Train storage (default: OUT/checkpoints)")
    ckpt.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ckpt.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept")
    ckpt.add_argument("--max-failures", type=int, default=3, help="automatic restarts after a worker fails")
    ckpt.add_argument("--validate-every", type=int, metavar="K",
                      help="render --validation-script with the current LoRA every K steps")
    ckpt.add_argument("--validation-script", metavar="URI", help="the fixed validation story script")
    ckpt.add_argument("--validation-steps", type=int, help="denoising steps of validation renders")
    ckpt.add_argument("--validation-encoder", metavar="FILE|tiny",
                      help="video-text encoder of the consistency metric: a ViCLIP checkpoint (needed "
                           "with real models), or tiny (the default with --preset tiny)")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="URI", help="prepared data (`prepare --out`)")
    parser.add_argument("--out", required=True, metavar="URI", help="output folder (local or s3://)")
    _add_model_flags(parser, device=False)
    _add_scorer_flags(parser)
    _add_cluster_flags(parser, "Ray Train")
    _add_fit_options(parser)


# ---------------------------------------------------------------------------------------
# Specs

def _model(args: argparse.Namespace):
    return model_spec_from_args(args)


def _default_geometry(model) -> tuple[int, int, int]:
    from storymem_model.presets import REAL_SHOT, TINY

    shot = TINY.shot if model.preset == "tiny" else REAL_SHOT
    return shot.height, shot.width, shot.num_frames


def prepare_spec_from_args(args: argparse.Namespace, *, clips: str | None = None, out: str | None = None):
    from storymem_model.training.specs import PrepareSpec

    model = _model(args)
    height, width, frames = _default_geometry(model)
    try:
        return PrepareSpec(
            clips=clips or args.clips, out=out or args.out, model=model, scorers=scorer_spec_from_args(args, required=True),
            height=args.height or height, width=args.width or width, num_frames=args.num_frames or frames,
            fps=args.fps, group_threshold=args.group_threshold, max_group_size=args.max_group_size,
            memory_candidates=args.memory_candidates, memory_sink=args.memory_sink,
            keyframe_threshold=args.keyframe_threshold, max_keyframes=args.max_keyframes,
            rows_per_shard=args.rows_per_shard, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker, max_clip_mb=args.max_clip_mb, ray_address=args.ray_address)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def validation_spec_from_args(args: argparse.Namespace, geometry: dict | None):
    """The validation render of `--validate-every` (None without it): the training's
    geometry, RoPE shift, fix_mem and transition (MM2V when the fit favours it)."""
    from storymem_model.evaluation.encoder_spec import VideoEncoderSpec
    from storymem_model.specs import RenderSettings, SamplingOverrides
    from storymem_model.training.specs import ValidationSpec

    if args.validate_every is None and args.validation_script is None:
        return None
    if not args.validation_script:
        raise ArgumentsError("--validate-every needs --validation-script (the story to render)")
    geometry = geometry or {}
    name = args.validation_encoder or ("tiny" if args.preset == "tiny" else None)
    if name is None:
        raise ArgumentsError("validating a real model needs --validation-encoder (a ViCLIP checkpoint); "
                             "the tiny encoder's numbers mean nothing")
    encoder = VideoEncoderSpec(kind="viclip", preset="tiny") if name == "tiny" \
        else VideoEncoderSpec(kind="viclip", viclip=name)
    try:
        settings = RenderSettings(
            transition="mm2v" if args.mm2v_prob > args.mi2v_prob else "mi2v", rope_shift=args.rope_shift or None,
            fix_mem=args.fix_mem, height=geometry.get("height"), width=geometry.get("width"),
            num_frames=geometry.get("num_frames"),
            sampling=SamplingOverrides(num_inference_steps=args.validation_steps))
        return ValidationSpec(script=args.validation_script, settings=settings, scorers=scorer_spec_from_args(args, required=True),
                              video_encoder=encoder)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def fit_spec_from_args(args: argparse.Namespace, *, data: str | None = None, geometry: dict | None = None):
    from storymem_model.training.specs import FitSpec

    data = data or args.data
    if geometry is None and args.validate_every:
        geometry = _prepared_geometry(data)
    try:
        return FitSpec(
            data=data, out=args.out, model=_model(args), steps=args.steps, expert=args.expert,
            workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lr=args.lr, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, grad_accum=args.grad_accum,
            max_memory=args.max_memory, mi2v_prob=args.mi2v_prob, mm2v_prob=args.mm2v_prob,
            rope_shift=args.rope_shift or None, fix_mem=args.fix_mem, boundary_ratio=args.boundary_ratio,
            timestep_shift=args.timestep_shift, seed=args.seed, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints, checkpoints=args.checkpoints, max_failures=args.max_failures,
            parallel=args.parallel, gradient_checkpointing=args.gradient_checkpointing,
            validate_every=args.validate_every, validation=validation_spec_from_args(args, geometry),
            ray_address=args.ray_address)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def _prepared_geometry(data: str) -> dict | None:
    """The training geometry of committed prepared data (validation renders at that size),
    if readable (else the fit itself names what is wrong with the data)."""
    from storymem_model import storage
    from storymem_model.training.prepared import read_manifest

    try:
        return read_manifest(data)["geometry"]
    except (FileNotFoundError, ValueError, KeyError, storage.StorageError, OSError):
        return None  # PreparedDataError is a ValueError


# ---------------------------------------------------------------------------------------
# Commands

def _error(command: str, exc: Exception) -> int:
    print(f"storymem train {command}: error: {exc}", file=sys.stderr)
    return 2


def run_prepare_command(args: argparse.Namespace) -> int:
    from flows.cli.cli_logging import setup_cli_logging
    from pipelines.training.prepare import run_prepare
    from storymem_model import storage
    from storymem_model.training.clip_manifest import ManifestError

    setup_cli_logging()
    try:
        spec = prepare_spec_from_args(args)
        storage.filesystem(spec.out)
    except (ArgumentsError, storage.StorageError) as exc:
        return _error("prepare", exc)
    try:
        result = run_prepare(spec)
    except ManifestError as exc:
        return _error("prepare", exc)
    print(result.message)
    return 0


def run_fit_command(args: argparse.Namespace) -> int:
    from flows.cli.cli_logging import setup_cli_logging
    from pipelines.training.fit import FitError, FitInputError, run_fit
    from storymem_model import storage

    setup_cli_logging()
    try:
        spec = fit_spec_from_args(args)
        storage.filesystem(spec.out)
    except (ArgumentsError, storage.StorageError) as exc:
        return _error("fit", exc)
    try:
        result = run_fit(spec)
    except FitInputError as exc:  # unusable data or model: like bad flags
        return _error("fit", exc)
    except FitError as exc:
        print(f"storymem train fit: {exc}", file=sys.stderr)
        return 1
    print(result.message)
    return 0


def run_flow_command(args: argparse.Namespace) -> int:
    from flows.cli.flow import run_flow_now
    from storymem_model import storage

    try:
        prepared_uri = storage.join(args.out, "prepared")
        prepare = prepare_spec_from_args(args, out=prepared_uri)
        geometry = {"height": prepare.height, "width": prepare.width, "num_frames": prepare.num_frames}
        fit = fit_spec_from_args(argparse.Namespace(**{**vars(args), "device": None}), data=prepared_uri,
                                 geometry=geometry)
    except ArgumentsError as exc:
        return _error("flow", exc)
    from flows.train_lora import train_lora

    state = run_flow_now(train_lora, prepare=prepare, fit=fit, publish_to=args.publish_to)
    if not state.is_completed():
        print(f"storymem train flow: {state.type.value}: {state.message}", file=sys.stderr)
        return 1
    print(state.result()["message"])
    return 0
