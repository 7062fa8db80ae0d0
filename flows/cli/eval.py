"""`storymem eval` and `storymem bench-stbench`: the paper's ST-Bench evaluation.

    storymem eval OUTPUT_URI [--scripts SOURCE] [--preset tiny | --viclip PATH ...]
    storymem bench-stbench --scripts SOURCE --out URI [--baseline independent] [model flags]

`eval` scores every committed story render under OUTPUT_URI and writes
`{OUTPUT_URI}/_eval/` (eval.parquet, summary.json, report.md, PNG charts), then prints the
Table-1-shaped summary. `bench-stbench` renders every script of SOURCE with the story runner
(the same model flags as `storymem render`), with `--baseline independent` also renders
each shot without memory into the same output (its own config hash), then evaluates both.

The flags become specs here and nowhere else: an `EvalEncoderSpec` for the evaluation
encoders and, for bench-stbench, one `RenderSpec` per method (the baseline is the same
specs with memory off). Scripts are listed and validated by the one script planner
(`pipelines.story_planner`), so --scripts takes a folder, a glob, a file or a manifest.

Encoders (nothing is downloaded): `--viclip` a ViCLIP checkpoint (the paper's), or
`--video-encoder clip --video-clip-checkpoint FILE` for the CLIP frame average; the
aesthetic score is the LAION predictor (`--aesthetic-head` on `--aesthetic-clip-checkpoint`,
CLIP ViT-L/14). `--preset tiny` builds tiny random versions of all of them.
"""
from __future__ import annotations

import argparse
import logging
import sys

from flows.cli.cli_logging import setup_cli_logging
from flows.cli.model_flags import (ArgumentsError, add_model_arguments, local_accelerator,
                                   render_spec_from_args, specs_from_args)
from storymem_model.evaluation.encoder_spec import (DEFAULT_VIDEO_CLIP_MODEL,
                                                    VIDEO_ENCODER_KINDS, AestheticSpec,
                                                    EvalEncoderSpec, VideoEncoderSpec)
from storymem_model.spec_json import SpecError

log = logging.getLogger("storymem.eval")

INDEPENDENT = "independent"


# ---------------------------------------------------------------------------------------
# flags -> specs


def add_encoder_arguments(parser: argparse.ArgumentParser, *, standalone: bool) -> None:
    """Evaluation encoder flags. `standalone` (storymem eval) also adds --preset, the
    aesthetic paths and --device, which bench-stbench shares with the model flags."""
    group = parser.add_argument_group(
        "evaluation encoders", "Video-text encoder and aesthetic predictor, from local files "
        "(the paper: ViCLIP and the LAION aesthetic predictor on CLIP ViT-L/14).")
    if standalone:
        group.add_argument("--preset", choices=["tiny"],
                           help="tiny random encoders and aesthetic head (numbers are "
                                "meaningless; for tests and the demo)")
    group.add_argument("--video-encoder", choices=VIDEO_ENCODER_KINDS, default="viclip",
                       help="ViCLIP (the paper's) or the mean of CLIP frame embeddings "
                            "(default %(default)s)")
    group.add_argument("--viclip", metavar="PATH",
                       help="ViCLIP checkpoint (e.g. ViClip-InternVid-10M-FLT.pth) or a "
                            "folder holding one")
    group.add_argument("--video-clip-checkpoint", metavar="FILE",
                       help="open_clip weights for --video-encoder clip")
    group.add_argument("--video-clip-model", default=DEFAULT_VIDEO_CLIP_MODEL,
                       help="open_clip model name of --video-clip-checkpoint "
                            "(default %(default)s)")
    if standalone:
        group.add_argument("--aesthetic-head", metavar="FILE",
                           help="LAION aesthetic predictor head weights")
        group.add_argument("--aesthetic-clip-checkpoint", metavar="FILE",
                           help="open_clip ViT-L/14 weights the aesthetic head runs on")
        group.add_argument("--device", metavar="DEV",
                           help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--aesthetic-frames", type=int, metavar="N",
                       help="score N evenly spaced frames per shot instead of every frame")
    group.add_argument("--report-dir", metavar="URI",
                       help="where eval.parquet and the report go (default OUT/_eval)")


def encoder_spec_from_args(args: argparse.Namespace) -> EvalEncoderSpec:
    """The evaluation encoders the flags name (ArgumentsError when they cannot work). The
    aesthetic predictor is checked first: it is needed whatever the video encoder."""
    try:
        aesthetic = AestheticSpec(head=args.aesthetic_head,
                                  clip_checkpoint=args.aesthetic_clip_checkpoint,
                                  frames=args.aesthetic_frames, preset=args.preset)
        video = VideoEncoderSpec(kind=args.video_encoder, viclip=args.viclip,
                                 clip_checkpoint=args.video_clip_checkpoint,
                                 clip_model=args.video_clip_model, preset=args.preset)
        return EvalEncoderSpec(video=video, aesthetic=aesthetic, device=args.device)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def read_scripts(source: str, out: str):
    """({story_id: StoryScript} in listing order, [InvalidScript]) of every script of
    `source`, through the story planner (ScriptSourceError when `source` is unusable); the
    scripts are read for their stories, no story folder is checked (no config hash)."""
    from pipelines.story_planner import InvalidScript, plan_items

    scripts, invalid = {}, []
    for item in plan_items(source, out, None, exclude=out):
        if isinstance(item, InvalidScript):
            invalid.append(item)
        else:
            scripts[item.story_id] = item.script
    return scripts, invalid


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines())


# ---------------------------------------------------------------------------------------
# commands


def add_eval_commands(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="score rendered stories with the paper's ST-Bench metrics",
        description="Score every committed story render under OUTPUT_URI (the render "
        "layout OUT/{story_id}/{config_hash}/) with the StoryMem paper's metrics: aesthetic "
        "quality, prompt following (global and single-shot) and cross-shot consistency (all "
        "pairs and top-10 pairs). Writes OUT/_eval/eval.parquet, summary.json, report.md and "
        "PNG charts, and prints the Table-1-shaped summary. Exit status 1 when a story could "
        "not be evaluated (the others still are), 2 for bad flags.")
    evaluate.add_argument("output", metavar="OUTPUT_URI",
                          help="render output folder or fsspec URI")
    evaluate.add_argument("--scripts", metavar="SOURCE",
                          help="only the stories of these scripts (a folder, glob, script "
                               "or manifest; their overview is the global prompt); default: "
                               "every render found")
    add_encoder_arguments(evaluate, standalone=True)
    evaluate.set_defaults(func=run_eval)

    bench = subparsers.add_parser(
        "bench-stbench", help="render a benchmark set of scripts, then evaluate it",
        description="Render every story script of --scripts with the story runner "
        "(resumable: committed stories are skipped), optionally the independent-shots "
        "baseline next to it, then run `storymem eval` on --out. Model flags as `storymem "
        "render`.")
    bench.add_argument("--scripts", required=True, metavar="SOURCE",
                       help="story scripts: a folder (*.json, *.json5), glob, script or "
                            "manifest, e.g. ST-Bench")
    bench.add_argument("--out", required=True, metavar="URI", help="output folder or URI")
    bench.add_argument("--baseline", choices=[INDEPENDENT], action="append", default=[],
                       help="also render every shot on its own without memory (the paper's "
                            "Wan2.2 independent row; T2V when the model has T2V experts)")
    bench.add_argument("--limit", type=int, metavar="N",
                       help="only the first N valid scripts (in listing order: by file name)")
    add_encoder_arguments(bench, standalone=False)
    add_model_arguments(bench)
    bench.set_defaults(func=run_bench_stbench)


def run_eval(args: argparse.Namespace) -> int:
    from storymem_model.evaluation.encoder_factory import build_encoders

    setup_cli_logging()
    try:
        spec = encoder_spec_from_args(args)
        scripts = None
        if args.scripts:
            scripts, invalid = read_scripts(args.scripts, args.output)
            for problem in invalid:
                log.error("script %s skipped: %s", problem.source, _one_line(problem.message))
        encoders = build_encoders(spec)
    except (ArgumentsError, ValueError, OSError) as exc:  # ScriptSourceError, missing files
        print(f"storymem eval: error: {exc}", file=sys.stderr)
        return 2
    return _evaluate_and_print(args.output, encoders, scripts, args.report_dir)


def _evaluate_and_print(out_uri: str, encoders, scripts, report_uri: str | None) -> int:
    from storymem_model.evaluation.benchmark import evaluate_output
    from storymem_model.evaluation.renders import EvaluationError
    from storymem_model.evaluation.report import table1_text

    try:
        result = evaluate_output(
            out_uri, encoders, scripts=scripts, report_uri=report_uri,
            progress=lambda e: log.info("evaluated %s (%s), %d/%d", e.story_id, e.method,
                                        e.done, e.total))
    except EvaluationError as exc:
        print(f"storymem eval: error: {exc}", file=sys.stderr)
        return 1
    print(f"ST-Bench metrics ({encoders.video.name}; aesthetic {encoders.aesthetic.name})")
    print(table1_text(result.summary_rows))
    print(f"report  {result.files['report.md']}")
    print(f"parquet {result.parquet_uri}")
    for row in result.errors:
        print(f"NOT EVALUATED {row.story_id}/{row.config_hash}: {row.error}")
    return 1 if result.errors else 0


def bench_render_specs(args: argparse.Namespace, accelerator: bool) -> dict:
    """{method: RenderSpec}: StoryMem from the flags, and with `--baseline independent` the
    same model and settings with memory off (no transitions, no references, no scorers).
    With `--sampling fast` every method is rendered twice, on the same scripts and seeds:
    "storymem-fast" as the flags say, "storymem" on the standard path (the same model
    without its distillation LoRA, standard sampling), side by side in one report."""
    from storymem_model.render_spec import resolve_render_spec

    first = render_spec_from_args(args, accelerator=accelerator)
    _, scorers, settings = specs_from_args(args)
    fast = settings.sampling_preset == "fast"
    variants = {"": (first.model, settings)}
    if fast:  # the standard path next to it: no distillation LoRA, standard sampling
        sampling = settings.sampling.replace(solver=None, step_list=None)
        variants = {"-fast": (first.model, settings),
                    "": (first.model.replace(distill_lora_dir=None),
                         settings.replace(sampling_preset="standard", sampling=sampling))}
    specs = {}
    for suffix, (model, chosen) in variants.items():
        specs["storymem" + suffix] = first if suffix == "-fast" or not fast else \
            resolve_render_spec(model, scorers, chosen)
        if INDEPENDENT in args.baseline:
            specs[INDEPENDENT + suffix] = resolve_render_spec(
                model, None, chosen.replace(memory=False, references=()))
    return specs


def run_bench_stbench(args: argparse.Namespace) -> int:
    from storymem_model.evaluation.encoder_factory import build_encoders
    from storymem_model.runner import open_runner

    setup_cli_logging()
    if not args.memory:
        print("storymem bench-stbench: error: --no-memory would render the StoryMem row "
              "without memory; use --baseline independent for the no-memory row",
              file=sys.stderr)
        return 2
    try:
        render_specs = bench_render_specs(args, local_accelerator())
        encoder_spec = encoder_spec_from_args(args)
        scripts, invalid = read_scripts(args.scripts, args.out)
        if args.limit is not None:
            scripts = dict(list(scripts.items())[:max(0, args.limit)])
        encoders = build_encoders(encoder_spec)
    except Exception as exc:  # noqa: BLE001 - bad flags, missing weights: a message, exit 2
        print(f"storymem bench-stbench: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for problem in invalid:
        log.error("script %s skipped: %s", problem.source, _one_line(problem.message))
    render_failures = []
    # One model at a time: the methods that share a model (memory on / off) share its
    # pipeline; a model with another LoRA stack (the fast path's) loads after the first
    # one is released.
    pipeline, pipeline_model = None, None
    for method, spec in render_specs.items():
        if spec.model != pipeline_model:
            pipeline = None  # release the previous model before loading the next
            try:
                runner = open_runner(spec)
            except Exception as exc:  # noqa: BLE001 - the model cannot load: exit 2
                print(f"storymem bench-stbench: error: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                return 2
            pipeline, pipeline_model = runner.pipeline, spec.model
        else:
            runner = open_runner(spec, pipeline=pipeline)
        for script in scripts.values():
            try:
                result = runner.render(script, args.out, progress=False)
            except Exception as exc:  # noqa: BLE001 - one story failing never stops the rest
                log.exception("%s render of %s failed", method, script.story_id)
                render_failures.append((script.story_id, method, f"{type(exc).__name__}: {exc}"))
                continue
            log.info("%s %s: %s (%d shots, %.1f s)", method, script.story_id, result.status,
                     result.shots_total, result.seconds)
    status = _evaluate_and_print(args.out, encoders, scripts, args.report_dir)
    for problem in invalid:
        print(f"SCRIPT SKIPPED {problem.source}: {_one_line(problem.message)}")
    for story_id, method, reason in render_failures:
        print(f"RENDER FAILED {story_id} ({method}): {reason}")
    return 1 if (render_failures or invalid or status) else 0
