"""`storymem batch`: the Ray batch render from the command line (see pipelines/batch_render.py)."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("storymem.batch")


def add_batch_command(subparsers) -> argparse.ArgumentParser:
    from storymem_model.cli_render import add_model_arguments

    parser = subparsers.add_parser(
        "batch", help="render many story scripts on Ray (story workers + shared scorers)",
        description="Render every story script of a folder, prefix, glob or manifest on Ray: "
        "story worker actors (each loads the model once) render stories one after another "
        "through the story runner, with CLIP and gate scorers shared by all workers and "
        "batched. A story's files go to OUT/{story_id}/{config_hash}/ exactly as with "
        "`storymem render`; the run's tables go to OUT/runs/{run_id}/ (stories.parquet, "
        "shots.parquet, errors.parquet, logs/, summary.json). Invalid scripts are recorded "
        "in errors.parquet and skipped; committed stories are skipped; a story whose worker "
        "dies resumes from its last committed shot. Exit status 0 when every story is "
        "rendered or skipped, 1 when any script or story failed (the others still render), "
        "2 when the batch cannot run (bad flags, bad --scripts, no worker can start).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scripts", required=True, metavar="URI",
                        help="a folder or prefix of *.json/*.json5 scripts, a glob, one "
                             "script, or a manifest (.jsonl or .parquet: one script URI or "
                             "inline script per row); local or s3://")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or fsspec URI (e.g. ./outputs, s3://bucket/prefix)")
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--workers", type=int, default=1,
                           help="story worker actors (each loads the pipeline once)")
    ray_group.add_argument("--gpus-per-worker", type=float, default=0.0,
                           help="GPUs per story worker; fractions share a GPU; 0 on CPU")
    ray_group.add_argument("--cpus-per-worker", type=float, default=0.5,
                           help="CPUs reserved per story worker")
    ray_group.add_argument("--ray-address", metavar="ADDR",
                           help="join an existing cluster ('auto', 'host:6379' or "
                                "'ray://host:10001'); default: an embedded local Ray on "
                                "127.0.0.1")
    ray_group.add_argument("--run-id", help="name of the run folder (default: UTC time + "
                                            "random suffix)")
    ray_group.add_argument("--max-attempts", type=int, default=3,
                           help="tries per story before it goes to errors.parquet")
    ray_group.add_argument("--worker-max-restarts", type=int, default=2,
                           help="Ray restarts of a crashed worker before it is replaced")
    ray_group.add_argument("--story-timeout", type=float, metavar="SECONDS",
                           help="kill and retry a story that runs longer than this")
    scorer_group = parser.add_argument_group("shared scorers")
    scorer_group.add_argument("--clip-actors", type=int, default=1,
                              help="CLIP scorer actors shared by all workers")
    scorer_group.add_argument("--gate-actors", type=int, default=1,
                              help="quality gate (aesthetic or HPSv3) scorer actors")
    scorer_group.add_argument("--scorer-batch-size", type=int, default=32,
                              help="images per scorer forward (requests from different "
                                   "stories are grouped up to this)")
    scorer_group.add_argument("--scorer-max-wait", type=float, default=0.05, metavar="SECONDS",
                              help="how long a scorer request waits for others to fill a batch")
    scorer_group.add_argument("--scorer-gpus", type=float, default=0.0,
                              help="GPUs per scorer actor")
    scorer_group.add_argument("--hps-checkpoint", metavar="FILE",
                              help="use HPSv3 (in its own environment) as the keyframe gate: "
                                   "the HPSv3 checkpoint file")
    scorer_group.add_argument("--hps-base-model", metavar="DIR",
                              help="the Qwen2-VL folder HPSv3 is built on")
    scorer_group.add_argument("--hps-python", metavar="PATH",
                              help="the HPS environment's interpreter (default: "
                                   ".hps-venv/bin/python, built by `make hps-env`)")
    parser.add_argument("--consistency", action="store_true",
                        help="add per-story cross-shot consistency (CLIP frame-average shot "
                             "embeddings, storymem_model.evaluation.metrics.story_consistency) to "
                             "stories.parquet")
    parser.add_argument("--progress", choices=["auto", "bar", "log"], default="auto",
                        help="a progress bar on a terminal (auto), always a bar, or log lines")
    add_model_arguments(parser)
    parser.set_defaults(func=run_batch_command)
    return parser


def options_from_args(args: argparse.Namespace):
    """BatchOptions from the parsed `storymem batch` flags."""
    from pipelines.batch_render import BatchError, BatchOptions
    from pipelines.scorer_pools import HPSOptions, ScorerPoolOptions

    hps = None
    if args.hps_checkpoint or args.hps_base_model:
        if not (args.hps_checkpoint and args.hps_base_model):
            raise BatchError("the HPSv3 gate needs both --hps-checkpoint and --hps-base-model")
        hps = HPSOptions(checkpoint=args.hps_checkpoint, base_model=args.hps_base_model,
                         threshold=args.gate_threshold,
                         **({"python": args.hps_python} if args.hps_python else {}))
    scorers = ScorerPoolOptions(
        clip_actors=args.clip_actors, gate_actors=args.gate_actors,
        max_batch_size=args.scorer_batch_size, max_wait_s=args.scorer_max_wait,
        gpus_per_actor=args.scorer_gpus)
    return BatchOptions(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, max_attempts=args.max_attempts,
        worker_max_restarts=args.worker_max_restarts, story_timeout_s=args.story_timeout,
        scorers=scorers, hps=hps, consistency=args.consistency,
        progress={"auto": None, "bar": True, "log": False}[args.progress])


def run_batch_command(args: argparse.Namespace) -> int:
    from pipelines.batch_render import BatchError, run_batch
    from pipelines.ray_runtime import RayConnectionError
    from pipelines.scorer_pools import ScorerPoolError
    from pipelines.script_source import ScriptSourceError
    from flows.cli.cli_logging import setup_cli_logging
    from storymem_model.storage import StorageError

    setup_cli_logging()
    try:
        options = options_from_args(args)
        model_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
        summary = run_batch(args.scripts, args.out, model_args, ray_address=args.ray_address,
                            run_id=args.run_id, options=options)
    except (BatchError, ScriptSourceError, RayConnectionError, ScorerPoolError,
            StorageError) as exc:
        print(f"storymem batch: error: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 1 if summary["failed"] else 0


def _print_summary(summary: dict) -> None:
    out = sys.stdout
    print(f"run {summary['run_id']}: {summary['rendered']} rendered, {summary['skipped']} "
          f"skipped, {summary['failed']} failed ({summary['invalid']} invalid scripts) in "
          f"{summary['wall_s']:.1f} s; {summary['shots_rendered']} shots "
          f"({summary['shots_per_hour']:.0f}/h)", file=out)
    for name in ("stories", "shots", "errors"):
        print(f"  {name + '.parquet':16s} {summary['tables'][name]}", file=out)
    print(f"  {'summary.json':16s} {summary['summary_uri']}", file=out)
    if summary["failed"]:
        print(f"  {summary['failed']} script(s)/story(ies) failed: see errors.parquet",
              file=out)


if __name__ == "__main__":  # python -m pipelines.cli_batch ... (same as `storymem batch`)
    _parser = argparse.ArgumentParser(prog="storymem")
    add_batch_command(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["batch", *sys.argv[1:]])
    sys.exit(run_batch_command(_args))
