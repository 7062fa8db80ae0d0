"""`storymem plan SCRIPT_OR_URI... --out URI`: what a render would do, without loading it.

The flags become the same resolved `RenderSpec` as `storymem render` and `storymem batch`
(`model_flags.render_spec_from_args`: content ids from model and scorer files' headers,
reference image hashes, every setting checked; no weights are loaded), hence the config
hash. Each source is listed and every script validated by the planner the batch and the
flows use (`pipelines.story_planner`), and each story is shown with its id, its output
folder and its status: committed, pending, or invalid with the planner's error type.

The default device (hence dtype, which is in the config hash) is the one a render on
this machine would use: `--device` when given, else cuda when this machine has a GPU.
To plan for other hosts (Ray workers with GPUs), pass their `--device` (and `--dtype`).
"""
from __future__ import annotations

import argparse
import json
import sys

from flows.cli.model_flags import (ArgumentsError, accelerator_from_args, add_model_arguments,
                                   render_spec_from_args)


def add_plan_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="show each story's id, output folder and status, loading no weights",
        description="Resolve the model, scorer and render flags into the config hash (model "
        "and scorer files are read for their content ids only; no weights load), list and "
        "validate the scripts, and print each story's id, its folder "
        "OUT/{story_id}/{config_hash}/ and whether it is committed, pending or invalid (with "
        "the error). The default device is this machine's (cuda with a GPU, else cpu): give "
        "--device (and --dtype) to plan for the hosts that will render. Exit status 0 when "
        "no script is invalid, 1 when some script is invalid, 2 for unusable flags or "
        "sources.")
    parser.add_argument("sources", nargs="+", metavar="SCRIPT_OR_URI",
                        help="a script, a folder or prefix of scripts, a glob, or a manifest "
                             "(.jsonl/.parquet), local or s3://")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="the output folder or URI the render would write to")
    parser.add_argument("--json", action="store_true",
                        help="print the plan as one JSON object")
    add_model_arguments(parser)
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    from pipelines.script_source import ScriptSourceError
    from pipelines.story_planner import StoryPlan
    from storymem_model import storage

    try:
        storage.filesystem(args.out)
        spec = render_spec_from_args(args, accelerator=accelerator_from_args(args))
        plans = [StoryPlan.build(source, args.out, spec.config_hash)
                 for source in args.sources]
    except (ArgumentsError, ScriptSourceError, storage.StorageError) as exc:
        print(f"storymem plan: error: {exc}", file=sys.stderr)
        return 2
    report = plan_report(spec, args.out, plans)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        _print_report(report)
    return 1 if report["invalid"] else 0


def plan_report(spec, out: str, plans) -> dict:
    """The plan of every source as one JSON object: config hash and resolved render spec,
    totals, and one row per listed item (`listing` = the source it came from)."""
    stories = []
    totals = {"listed": 0, "pending": 0, "committed": 0, "invalid": 0}
    for plan in plans:
        as_dict = plan.to_dict()
        for name in totals:
            totals[name] += as_dict[name]
        stories += [{"listing": plan.source, **row} for row in as_dict["stories"]]
    return {"config_hash": spec.config_hash, "out": out, **totals, "stories": stories,
            "render": spec.to_dict()}


def _print_report(report: dict) -> None:
    out = sys.stdout
    print(f"config {report['config_hash']}: stories go to "
          f"{report['out'].rstrip('/')}/{{story_id}}/{report['config_hash']}/", file=out)
    for row in report["stories"]:
        if row["status"] == "invalid":
            first, *rest = row["message"].splitlines() or [""]
            print(f"{'invalid':9s} {row['source']}: {row['error_type']}: {first}", file=out)
            for line in rest:
                print(f"            {line}", file=out)
        else:
            print(f"{row['status']:9s} {row['story_id']}  {row['story_uri']}", file=out)
    print(f"{report['listed']} listed: {report['committed']} committed, "
          f"{report['pending']} pending, {report['invalid']} invalid", file=out)
