"""`storymem eval` and `storymem bench-stbench`: the paper's ST-Bench evaluation.

    storymem eval OUTPUT_URI [--scripts DIR] [--preset tiny | --viclip PATH ...]
    storymem bench-stbench --scripts DIR --out URI [--baseline independent] [model flags]

`eval` scores every committed story render under OUTPUT_URI and writes
`{OUTPUT_URI}/_eval/` (eval.parquet, summary.json, report.md, PNG charts), then prints the
Table-1-shaped summary. `bench-stbench` renders every script in DIR with the story runner
(the same model flags as `storymem render`), with `--baseline independent` also renders
each shot without memory into the same output (its own config hash), then evaluates both.

Encoders (nothing is downloaded): `--viclip` a ViCLIP checkpoint (the paper's), or
`--video-encoder clip --video-clip-checkpoint FILE` for the CLIP frame average; the
aesthetic score is the LAION predictor (`--aesthetic-head` on `--aesthetic-clip-checkpoint`,
CLIP ViT-L/14). `--preset tiny` builds tiny random versions of all of them.
"""
from __future__ import annotations

import argparse
import logging
import posixpath
import sys

from flows.cli.cli_logging import setup_cli_logging

log = logging.getLogger("storymem.eval")

SCRIPT_SUFFIXES = (".json", ".json5")
DEFAULT_VIDEO_CLIP_MODEL = "ViT-L-14-quickgelu"


class EvalSetupError(ValueError):
    """Flags or inputs that do not allow an evaluation to start."""


# ---------------------------------------------------------------------------------------
# flags


def add_encoder_arguments(parser: argparse.ArgumentParser, *, standalone: bool) -> None:
    """Evaluation encoder flags. `standalone` (storymem eval) also adds --preset, the
    aesthetic paths and --device, which bench-stbench takes from the model flags."""
    group = parser.add_argument_group(
        "evaluation encoders", "Video-text encoder and aesthetic predictor, from local files "
        "(the paper: ViCLIP and the LAION aesthetic predictor on CLIP ViT-L/14).")
    if standalone:
        group.add_argument("--preset", choices=["tiny"],
                           help="tiny random encoders and aesthetic head (numbers are "
                                "meaningless; for tests and the demo)")
    group.add_argument("--video-encoder", choices=["viclip", "clip"], default="viclip",
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


def encoders_from_args(args: argparse.Namespace, preset: str | None):
    """(video-text encoder, aesthetic scorer) for the flags; raises EvalSetupError."""
    from storymem_model.scorers import AestheticScorer, OpenClipEmbedder
    from storymem_model.scorers.aesthetic_scorer import AESTHETIC_CLIP_MODEL
    from storymem_model.evaluation.video_encoders import (ClipFrameAverageEncoder, ViCLIPEncoder,
                                               tiny_viclip_encoder)

    device = getattr(args, "device", None)
    real_aesthetic = bool(args.aesthetic_head or args.aesthetic_clip_checkpoint)
    if real_aesthetic and not (args.aesthetic_head and args.aesthetic_clip_checkpoint):
        raise EvalSetupError("the aesthetic predictor needs both --aesthetic-head and "
                             "--aesthetic-clip-checkpoint")
    if args.aesthetic_frames is not None and args.aesthetic_frames < 1:
        raise EvalSetupError(f"--aesthetic-frames must be >= 1, got {args.aesthetic_frames}")
    shared_clip = None
    if real_aesthetic:
        aesthetic = AestheticScorer.from_checkpoint(
            args.aesthetic_head, args.aesthetic_clip_checkpoint, AESTHETIC_CLIP_MODEL,
            device=device)
        if (args.video_clip_checkpoint == args.aesthetic_clip_checkpoint
                and args.video_clip_model == AESTHETIC_CLIP_MODEL):
            shared_clip = aesthetic.embedder  # one ViT-L/14 for both
    elif preset == "tiny":
        aesthetic = AestheticScorer.tiny()
    else:
        raise EvalSetupError("no aesthetic predictor: give --aesthetic-head and "
                             "--aesthetic-clip-checkpoint, or --preset tiny")

    if args.video_encoder == "viclip":
        if args.viclip:
            encoder = ViCLIPEncoder.from_checkpoint(args.viclip, device=device)
        elif preset == "tiny":
            encoder = tiny_viclip_encoder(device=device)
        else:
            raise EvalSetupError("no video-text encoder: give --viclip PATH (or "
                                 "--video-encoder clip --video-clip-checkpoint FILE, or "
                                 "--preset tiny)")
    else:
        if shared_clip is not None:
            embedder = shared_clip
        elif args.video_clip_checkpoint:
            embedder = OpenClipEmbedder(args.video_clip_model, args.video_clip_checkpoint,
                                        device=device)
        elif preset == "tiny":
            embedder = OpenClipEmbedder.tiny(device=device)
        else:
            raise EvalSetupError("--video-encoder clip needs --video-clip-checkpoint FILE "
                                 "(or --preset tiny)")
        encoder = ClipFrameAverageEncoder(embedder)
    return encoder, aesthetic


def load_script_folder(folder: str) -> tuple[dict, list[tuple[str, str]]]:
    """({story_id: StoryScript}, [(source, problem)]) for every *.json/*.json5 in `folder`."""
    from storymem_model import storage
    from storymem_model.story_script import ScriptError, load_script

    fs, root = storage.filesystem(folder)
    if not fs.isdir(root):
        raise EvalSetupError(f"--scripts {folder} is not a folder")
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(SCRIPT_SUFFIXES))
    if not names:
        raise EvalSetupError(f"no story scripts (*.json, *.json5) in {folder}")
    scripts, failures = {}, []
    for path in names:
        source = storage.join(folder, posixpath.basename(path))
        try:
            script = load_script(source)
        except ScriptError as exc:
            failures.append((source, str(exc)))
            continue
        if script.story_id in scripts:
            failures.append((source, f"same story as {scripts[script.story_id].source}"))
            continue
        scripts[script.story_id] = script
    return scripts, failures


# ---------------------------------------------------------------------------------------
# commands


def add_eval_commands(subparsers) -> None:
    from storymem_model.cli_render import add_model_arguments

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
    evaluate.add_argument("--scripts", metavar="DIR",
                          help="only the stories of these scripts (their overview is the "
                               "global prompt); default: every render found")
    add_encoder_arguments(evaluate, standalone=True)
    evaluate.set_defaults(func=run_eval)

    bench = subparsers.add_parser(
        "bench-stbench", help="render a benchmark set of scripts, then evaluate it",
        description="Render every story script in --scripts with the story runner (resumable: "
        "committed stories are skipped), optionally the independent-shots baseline next to "
        "it, then run `storymem eval` on --out. Model flags as `storymem render`.")
    bench.add_argument("--scripts", required=True, metavar="DIR",
                       help="folder of story scripts (*.json, *.json5), e.g. ST-Bench")
    bench.add_argument("--out", required=True, metavar="URI", help="output folder or URI")
    bench.add_argument("--baseline", choices=["independent"], action="append", default=[],
                       help="also render every shot on its own without memory (the paper's "
                            "Wan2.2 independent row; T2V when the model has T2V experts)")
    bench.add_argument("--limit", type=int, metavar="N",
                       help="only the first N scripts (sorted by file name)")
    add_encoder_arguments(bench, standalone=False)
    add_model_arguments(bench)
    bench.set_defaults(func=run_bench_stbench)


def run_eval(args: argparse.Namespace) -> int:
    setup_cli_logging()
    try:
        scripts = None
        if args.scripts:
            scripts, failures = load_script_folder(args.scripts)
            for source, problem in failures:
                log.error("script %s skipped: %s", source, problem)
        encoder, aesthetic = encoders_from_args(args, args.preset)
    except (EvalSetupError, ValueError, OSError) as exc:
        print(f"storymem eval: error: {exc}", file=sys.stderr)
        return 2
    return _evaluate_and_print(args, args.output, encoder, aesthetic, scripts)


def _evaluate_and_print(args, out_uri, encoder, aesthetic, scripts) -> int:
    from storymem_model.evaluation.eval_report import table1_text
    from storymem_model.evaluation.story_eval import EvaluationError, evaluate_output

    try:
        result = evaluate_output(
            out_uri, encoder, aesthetic, scripts=scripts, report_uri=args.report_dir,
            aesthetic_frames=args.aesthetic_frames,
            progress=lambda e: log.info("evaluated %s (%s), %d/%d", e["story_id"],
                                        e["method"], e["done"], e["total"]))
    except EvaluationError as exc:
        print(f"storymem eval: error: {exc}", file=sys.stderr)
        return 1
    print(f"ST-Bench metrics ({encoder.name}; aesthetic {aesthetic.name})")
    print(table1_text(result.summary_rows))
    print(f"report  {result.files['report.md']}")
    print(f"parquet {result.parquet_uri}")
    for row in result.errors:
        print(f"NOT EVALUATED {row['story_id']}/{row['config_hash']}: {row['error']}")
    return 1 if result.errors else 0


def run_bench_stbench(args: argparse.Namespace) -> int:
    from storymem_model.cli_render import config_from_args, pipeline_from_args, \
        references_from_args, scorers_from_args
    from storymem_model.runner import StoryRunner

    setup_cli_logging()
    if not args.preset and not args.model_dir:
        print("storymem bench-stbench: error: give --preset tiny or --model-dir DIR",
              file=sys.stderr)
        return 2
    if not getattr(args, "memory", True):
        print("storymem bench-stbench: error: --no-memory would render the StoryMem row "
              "without memory; use --baseline independent for the no-memory row",
              file=sys.stderr)
        return 2
    try:
        scripts, failures = load_script_folder(args.scripts)
        if args.limit is not None:
            keep = sorted(scripts.values(), key=lambda s: s.source)[:max(0, args.limit)]
            scripts = {s.story_id: s for s in keep}
        encoder, aesthetic = encoders_from_args(args, args.preset)
        references = references_from_args(args)
        pipeline = pipeline_from_args(args)
        scorers = scorers_from_args(args)
        runners = {"storymem": StoryRunner(
            pipeline, scorers, config_from_args(args, pipeline, scorers, references),
            references=references)}
        if "independent" in args.baseline:  # same model and flags, memory off
            config = config_from_args(args, pipeline, scorers, []).replace(
                memory=False, transition="none")
            runners["independent"] = StoryRunner(pipeline, scorers, config)
    except Exception as exc:  # noqa: BLE001 - bad flags, missing weights: a message, exit 2
        print(f"storymem bench-stbench: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for source, problem in failures:
        log.error("script %s skipped: %s", source, problem)
    render_failures = []
    for script in sorted(scripts.values(), key=lambda s: s.source):
        for method, runner in runners.items():
            try:
                result = runner.render(script, args.out, progress=False)
            except Exception as exc:  # noqa: BLE001 - one story failing never stops the rest
                log.exception("%s render of %s failed", method, script.story_id)
                render_failures.append((script.story_id, method, f"{type(exc).__name__}: {exc}"))
                continue
            log.info("%s %s: %s (%d shots, %.1f s)", method, script.story_id, result.status,
                     result.shots_total, result.seconds)
    status = _evaluate_and_print(args, args.out, encoder, aesthetic, scripts)
    for source, problem in failures:
        print(f"SCRIPT SKIPPED {source}: " + " ".join(p.strip() for p in problem.splitlines()))
    for story_id, method, reason in render_failures:
        print(f"RENDER FAILED {story_id} ({method}): {reason}")
    return 1 if (render_failures or failures or status) else 0
