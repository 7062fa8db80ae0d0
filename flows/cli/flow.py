"""`storymem flow nightly|dataset`: run the Prefect flows from the command line.

With no Prefect server configured (`PREFECT_API_URL` unset) Prefect starts a temporary
local server for the run: nothing to set up. With `PREFECT_API_URL` set, the run shows up
on that server like a deployment's run. The model, scorer and render flags are those of
`storymem render` (`model_flags.add_model_arguments`); they become the flow's typed
parameters (`ModelSpec`, `ScorerSpec`, `RenderSettings`), and `--workers`,
`--gpus-per-worker` and `--batch-args` become its `BatchOptions` - the same values a
deployment gives as JSON (infra/prefect.yaml).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys

from flows.cli.model_flags import (ArgumentsError, add_model_arguments,
                                   model_spec_from_args, render_settings_from_args,
                                   scorer_spec_from_args)

# Prefect's default (20 s) is too short for a temporary server on a busy small machine.
EPHEMERAL_STARTUP_TIMEOUT_S = 120


def add_flow_commands(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "flow", help="run the Prefect flows (nightly render, dataset generation, LoRA training)",
        description="Run a storymem Prefect flow once, now. Without PREFECT_API_URL Prefect "
        "starts a temporary local server for the run; with it, the run is recorded on that "
        "server. The same flows run on a schedule as deployments (infra/prefect.yaml).")
    flows = parser.add_subparsers(dest="flow", metavar="FLOW", required=True)

    nightly = flows.add_parser(
        "nightly", help="render every new script of a source (skips committed stories)",
        description="Resolve the model and settings into the config hash, list the scripts "
        "of --source, validate them, drop stories already committed in --out, render the "
        "rest with the Ray batch pipeline, and publish the run's tables and summary to "
        "OUT/runs/RUN_ID/. A failing story does not fail the run; the exit status is 1 when "
        "any script or story failed, 2 when the run could not happen (bad flags or source, "
        "output locked by another run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(nightly)
    add_model_arguments(nightly)
    nightly.set_defaults(func=run_flow_command, flow_kind="nightly")

    dataset = flows.add_parser(
        "dataset", help="render stories and write a shot-level training dataset",
        description="Render the scripts of --source (committed stories in --render-out are "
        "reused) and write a training dataset to --out: data/split=*/STORY.parquet (one row "
        "per shot: video URI, prompt and context, keyframe images and ids, CLIP embeddings, "
        "aesthetic scores, memory used), dataset_card.json and _COMMITTED.json. The CLIP "
        "of the scorer flags embeds keyframes and prompts (also with --no-memory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(dataset)
    dataset.add_argument("--render-out", metavar="URI",
                         help="where stories are rendered (default: OUT/renders)")
    dataset.add_argument("--validation-percent", type=float, default=10.0,
                         help="share of stories in split=validation (by story id hash)")
    dataset.add_argument("--name", dest="dataset_name", help="dataset name in the card")
    add_model_arguments(dataset)
    dataset.set_defaults(func=run_flow_command, flow_kind="dataset")

    from flows.cli.train import add_train_flow_command

    add_train_flow_command(flows, "train")  # the same command as `storymem train flow`
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="URI",
                        help="scripts: a folder/prefix, glob, script or manifest (local or s3://)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or URI (local or s3://)")
    group = parser.add_argument_group("batch and cluster")
    group.add_argument("--ray-address", metavar="URL",
                       help="a Ray cluster's job server (http://HEAD:8265): the batch is "
                            "submitted there as a Ray job; default: run here on an embedded "
                            "local Ray")
    group.add_argument("--workers", type=int, default=1, help="story worker actors")
    group.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per story worker (fractions share a GPU; 0 on CPU); the "
                            "default device and dtype, hence the config hash, follow it")
    group.add_argument("--batch-args", default="", metavar="'FLAGS'",
                       help="other `storymem batch` run options as one quoted string, e.g. "
                            "'--clip-actors 2 --max-attempts 5' (model and render flags go "
                            "to this command directly)")
    group.add_argument("--run-id", help="run folder name (default: KIND-DATE-FLOWRUN); "
                                        "letters, digits, '-', '_' and '.'")
    group.add_argument("--job-timeout", type=float, metavar="SECONDS",
                       help="stop the cluster job if it runs longer than this (finished "
                            "shots are kept; the next run resumes)")
    run = parser.add_argument_group("retries and locking")
    run.add_argument("--retries", type=int, default=3,
                     help="retries of storage and cluster steps (transient errors only)")
    run.add_argument("--retry-backoff", type=float, default=10.0, metavar="SECONDS",
                     help="first retry delay; doubles each time")
    run.add_argument("--lock-wait", "--wait-lock", dest="lock_wait", type=float, default=0.0,
                     metavar="SECONDS",
                     help="wait this long for another run holding the output lock")
    run.add_argument("--lock-ttl", type=float, default=900.0, metavar="SECONDS",
                     help="lease of the output lock (renewed every TTL/3 by the flow, then by "
                          "the batch it hands the lock to)")


def flow_batch_options(args: argparse.Namespace):
    """BatchOptions from --workers, --gpus-per-worker and --batch-args, read by the
    `storymem batch` parser and mapped by its `batch_options_from_args` (no render spec is
    resolved here: the flow resolves it once, in its first task). ArgumentsError names a
    bad or misplaced flag: the model, render and lock flags of `storymem batch` are the
    flow's own (the flow holds the output lock and hands it to its batch), refused inside
    --batch-args."""
    from flows.cli.batch import add_batch_command, batch_options_from_args
    from flows.cli.lock_flags import add_lock_arguments

    parser = argparse.ArgumentParser(prog="storymem", exit_on_error=False)
    batch = add_batch_command(parser.add_subparsers(dest="command", required=True))
    flow_flags: dict[str, str] = {}  # dest -> flag, of the flags that are the flow's own
    for add_arguments in (add_model_arguments, add_lock_arguments):
        probe = argparse.ArgumentParser(add_help=False)
        add_arguments(probe)
        for action in probe._actions:
            if action.option_strings:
                flow_flags.setdefault(action.dest, action.option_strings[0])
    for action in batch._actions:
        if action.dest in flow_flags:
            action.default = argparse.SUPPRESS  # set only when given
    batch_args = shlex.split(args.batch_args or "")
    argv = ["batch", "--scripts", args.source, "--out", args.out,
            "--workers", str(args.workers), "--gpus-per-worker", str(args.gpus_per_worker),
            *batch_args]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        message = stderr.getvalue().strip() or str(exc)
        raise ArgumentsError(f"--batch-args {batch_args}: {message}") from None
    misplaced = [flag for dest, flag in flow_flags.items() if hasattr(parsed, dest)]
    if misplaced or parsed.spec:
        raise ArgumentsError(f"--batch-args takes `storymem batch` run options only; give "
                             f"{', '.join(misplaced or ['--spec'])} to `storymem flow` "
                             "itself (--lock-wait/--lock-ttl for the lock)")
    return batch_options_from_args(parsed)


def flow_kwargs(args: argparse.Namespace) -> dict:
    """The flow's parameters from the parsed command line: typed specs, no flag lists."""
    from pipelines.batch.spec import run_id_problem

    if args.run_id is not None and run_id_problem(args.run_id):
        raise ArgumentsError(f"--run-id: {run_id_problem(args.run_id)}")
    model = model_spec_from_args(args)
    # The dataset embeds keyframes and prompts with the scorer flags' CLIP even when the
    # render itself selects no keyframes (--no-memory).
    scorers = scorer_spec_from_args(args, required=args.flow_kind == "dataset")
    kwargs = dict(
        source=args.source, out=args.out, model=model, scorers=scorers,
        render=render_settings_from_args(args), batch=flow_batch_options(args),
        ray_address=args.ray_address, run_id=args.run_id, retries=args.retries,
        retry_backoff_s=args.retry_backoff, lock_wait_s=args.lock_wait,
        lock_ttl_s=args.lock_ttl, job_timeout_s=args.job_timeout)
    if args.flow_kind == "dataset":
        kwargs.update(render_out=args.render_out, validation_percent=args.validation_percent,
                      dataset_name=args.dataset_name)
    return kwargs


def run_flow_now(flow_fn, **kwargs):
    """Run a Prefect flow once, now; its final state. Without PREFECT_API_URL Prefect
    starts a temporary local server for it, given EPHEMERAL_STARTUP_TIMEOUT_S to start."""
    from prefect.settings import (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  temporary_settings)

    timeout = max(EPHEMERAL_STARTUP_TIMEOUT_S,
                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout}):
        return flow_fn(**kwargs, return_state=True)


def run_flow_command(args: argparse.Namespace) -> int:
    try:
        kwargs = flow_kwargs(args)
    except ArgumentsError as exc:
        print(f"storymem flow {args.flow_kind}: error: {exc}", file=sys.stderr)
        return 2
    if args.flow_kind == "nightly":
        from flows.nightly_render import nightly_render as flow_fn
    else:
        from flows.generate_dataset import generate_dataset as flow_fn
    state = run_flow_now(flow_fn, **kwargs)
    if not state.is_completed():
        print(f"storymem flow {args.flow_kind}: {state.type.value}: {state.message}",
              file=sys.stderr)
        return 2
    summary = state.result()
    print(summary["message"])
    for key in ("summary_uri", "run_uri", "errors_uri", "dataset_card_uri"):
        if summary.get(key):
            print(f"  {key:17s} {summary[key]}")
    return 1 if summary.get("failures") else 0
