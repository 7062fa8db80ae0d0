"""`storymem batch`: the Ray batch render from the command line (see pipelines/batch/).

Flags become one `BatchSpec` here (`batch_spec_from_args`), resolved without loading any
weights, so every unusable setting fails in seconds with exit status 2 before Ray starts.
`--spec URI` reads a BatchSpec JSON instead (local or s3://): the Prefect cluster path
submits that as the Ray job's entrypoint.

The batch driver holds the output lock (`OUT/_locks/render.json`) for the whole run:
`--wait-lock` / `--lock-ttl` (`lock_flags`) become `BatchSpec.lock_wait_s` /
`lock_ttl_s`. SIGTERM (a stopped Ray job) exits through the driver's cleanup, so the
workers are killed and the lock released.
"""
from __future__ import annotations

import argparse
import logging
import sys

from flows.cli.lock_flags import add_lock_arguments, sigterm_exits
from flows.cli.model_flags import (ArgumentsError, add_model_arguments,
                                   render_spec_from_args)

log = logging.getLogger("storymem.batch")

# Exit status: 0 every story rendered or skipped, 1 a script or story failed, 2 the batch
# could not run.
EXIT_FAILURES = 1
EXIT_UNUSABLE = 2


def add_batch_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "batch", help="render many story scripts on Ray (story workers + shared scorers)",
        description="Render every story script of a folder, prefix, glob or manifest on Ray: "
        "story worker actors (each loads the model once) render stories one after another "
        "through the story runner, with CLIP and gate scorers shared by all workers and "
        "batched. A story's files go to OUT/{story_id}/{config_hash}/ exactly as with "
        "`storymem render`; the run's tables go to OUT/runs/{run_id}/ (stories.parquet, "
        "shots.parquet, errors.parquet, logs/, summary.json; every row is also written as "
        "a part under parts/ the moment it is known, and running the same --run-id again "
        "continues an interrupted run). Invalid scripts are recorded in errors.parquet "
        "and skipped; committed stories are skipped; a story whose worker dies resumes "
        "from its last committed shot. The driver holds the output lock "
        "OUT/_locks/render.json while it runs (the lock `storymem render` takes): a second "
        "run on OUT exits at once naming the holder, unless --wait-lock. Exit status 0 "
        "when every story is rendered or skipped, 1 when any script or story failed (the "
        "others still render), 2 when the batch cannot run or was stopped (bad flags, bad "
        "--scripts, no worker can start, output locked by another run, lock lost).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--spec", metavar="URI",
                        help="read the whole run from a BatchSpec JSON file (local or s3://) "
                             "instead of flags; give no other flag with it")
    parser.add_argument("--scripts", metavar="URI",
                        help="a folder or prefix of *.json/*.json5 scripts, a glob, one "
                             "script, or a manifest (.jsonl or .parquet: one script URI or "
                             "inline script per row); local or s3:// (required without "
                             "--spec)")
    parser.add_argument("--out", metavar="URI",
                        help="output folder or fsspec URI (e.g. ./outputs, s3://bucket/prefix; "
                             "required without --spec)")
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
                                            "random suffix); an existing one is continued")
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
                              help="images grouped into one scorer call (requests from "
                                   "different stories are grouped up to this)")
    scorer_group.add_argument("--scorer-max-wait", type=float, default=0.05, metavar="SECONDS",
                              help="how long a scorer request waits for others to fill a batch")
    scorer_group.add_argument("--scorer-gpus", type=float, default=0.0,
                              help="GPUs per scorer actor")
    scorer_group.add_argument("--scorer-restarts", type=int, default=3,
                              help="Ray restarts of a crashed scorer actor; past them the "
                                   "driver replaces it (at most 2 x actors per run, then the "
                                   "batch stops with the error)")
    parser.add_argument("--consistency", action="store_true",
                        help="add per-story cross-shot consistency (CLIP frame-average shot "
                             "embeddings, storymem_model.evaluation.metrics.story_consistency) "
                             "to stories.parquet")
    parser.add_argument("--progress", choices=["auto", "bar", "log"], default="auto",
                        help="a progress bar on a terminal (auto), always a bar, or log lines")
    parser.add_argument("--log-flush", type=float, default=10.0, metavar="SECONDS",
                        help="write the worker logs to OUT/runs/RUN_ID/logs/ at least this "
                             "often while the run goes (a killed driver loses at most this "
                             "much of them)")
    add_lock_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(func=run_batch_command)
    return parser


def batch_options_from_args(args: argparse.Namespace):
    """The BatchOptions of the `storymem batch` run flags (no model flag is read, nothing
    is resolved); ArgumentsError if a value is unusable."""
    from pipelines.batch.spec import BatchOptions, ScorerPoolOptions
    from storymem_model.spec_json import SpecError

    try:
        return BatchOptions(
            workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, max_attempts=args.max_attempts,
            worker_max_restarts=args.worker_max_restarts, story_timeout_s=args.story_timeout,
            scorers=ScorerPoolOptions(
                clip_actors=args.clip_actors, gate_actors=args.gate_actors,
                max_batch_size=args.scorer_batch_size, max_wait_s=args.scorer_max_wait,
                gpus_per_actor=args.scorer_gpus, max_restarts=args.scorer_restarts),
            consistency=args.consistency, progress=args.progress, log_flush_s=args.log_flush)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def batch_spec_from_args(args: argparse.Namespace):
    """The BatchSpec the `storymem batch` flags describe (ArgumentsError if unusable)."""
    from pipelines.batch.spec import BatchSpec
    from storymem_model.spec_json import SpecError

    if not args.scripts or not args.out:
        raise ArgumentsError("give --scripts URI and --out URI (or --spec URI)")
    options = batch_options_from_args(args)
    try:
        render = render_spec_from_args(args, accelerator=args.gpus_per_worker > 0)
        return BatchSpec(scripts=args.scripts, out=args.out, render=render, options=options,
                         run_id=args.run_id, ray_address=args.ray_address,
                         lock_ttl_s=args.lock_ttl, lock_wait_s=args.wait_lock)
    except SpecError as exc:
        raise ArgumentsError(str(exc)) from None


def read_batch_spec(uri: str):
    """The BatchSpec stored at `uri` (ArgumentsError naming the URI if unusable)."""
    from pipelines.batch.spec import MAX_SPEC_BYTES, BatchSpec
    from storymem_model import storage
    from storymem_model.spec_json import SpecError

    try:
        return BatchSpec.from_json(storage.read_bytes(uri, max_bytes=MAX_SPEC_BYTES))
    except FileNotFoundError:
        raise ArgumentsError(f"--spec {uri}: no such file") from None
    except (storage.StorageError, SpecError) as exc:
        raise ArgumentsError(f"--spec {uri}: {exc}") from None


def _flags_besides_spec(args: argparse.Namespace) -> list[str]:
    """The flags given together with --spec (their values differ from the defaults)."""
    parser = argparse.ArgumentParser(prog="storymem", add_help=False)
    batch = add_batch_command(parser.add_subparsers(dest="command"))
    ignored = {"spec", "func", "command"}
    return sorted("--" + key.replace("_", "-") for key, value in vars(args).items()
                  if key not in ignored and value != batch.get_default(key))


def run_batch_command(args: argparse.Namespace) -> int:
    from flows.cli.cli_logging import setup_cli_logging
    from pipelines.batch.driver import BatchError, run_batch
    from storymem_model.output_lock import OutputLockedError
    from pipelines.ray_runtime import RayConnectionError
    from pipelines.scorer_pools import ScorerPoolError
    from pipelines.script_source import ScriptSourceError
    from storymem_model.storage import StorageError

    setup_cli_logging()
    try:
        if args.spec:
            others = _flags_besides_spec(args)
            if others:
                raise ArgumentsError(f"--spec carries the whole run; drop {', '.join(others)}")
            spec = read_batch_spec(args.spec)
        else:
            spec = batch_spec_from_args(args)
        with sigterm_exits():
            summary = run_batch(spec)
    except (ArgumentsError, BatchError, ScriptSourceError, RayConnectionError,
            ScorerPoolError, StorageError, OutputLockedError) as exc:
        print(f"storymem batch: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    _print_summary(summary)
    return EXIT_FAILURES if summary.failed else 0


def _print_summary(summary) -> None:
    out = sys.stdout
    print(f"run {summary.run_id}: {summary.rendered} rendered, {summary.skipped} skipped, "
          f"{summary.failed} failed ({summary.invalid} invalid scripts) in "
          f"{summary.wall_s:.1f} s; {summary.shots_rendered} shots "
          f"({summary.shots_per_hour:.0f}/h)", file=out)
    for name in ("stories", "shots", "errors"):
        print(f"  {name + '.parquet':16s} {getattr(summary.tables, name)}", file=out)
    print(f"  {'summary.json':16s} {summary.summary_uri}", file=out)
    if summary.failed:
        print(f"  {summary.failed} script(s)/story(ies) failed: see errors.parquet", file=out)


if __name__ == "__main__":  # python -m flows.cli.batch ... (same as `storymem batch`)
    _parser = argparse.ArgumentParser(prog="storymem")
    add_batch_command(_parser.add_subparsers(dest="command", required=True))
    sys.exit(run_batch_command(_parser.parse_args(["batch", *sys.argv[1:]])))
