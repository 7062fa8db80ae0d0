"""The `storymem` command: each subcommand is one module of this package, registered here.

All command-line parsing lives in `flows/cli/`: a command module turns its flags into
typed specs (`flows.cli.model_flags`) and hands those to the layer below; nothing under
`pipelines/`, `actors/` or `storymem_model/` sees an argparse Namespace.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, function) pairs, in the order `storymem --help` lists the commands; each
# function takes the argparse subparsers object.
COMMAND_MODULES = [
    ("flows.cli.render", "add_render_command"),
    ("flows.cli.plan", "add_plan_command"),
    ("flows.cli.batch", "add_batch_command"),
    ("flows.cli.serve", "add_serve_command"),
    ("flows.cli.eval", "add_eval_commands"),
    ("flows.cli.flow", "add_flow_commands"),
    ("flows.cli.train", "add_train_commands"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storymem",
        description="StoryMem: multi-shot story videos with consistent characters on Wan2.2.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, function_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        getattr(module, function_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
