"""The `storymem` command: every layer registers its own subcommands here."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, function) pairs; each function takes the argparse subparsers object.
# Import direction stays flows -> pipelines -> actors -> storymem_model.
COMMAND_MODULES = [
    ("storymem_model.cli_render", "add_render_command"),
    ("storymem_model.cli_eval", "add_eval_commands"),
    ("pipelines.cli_batch", "add_batch_command"),
    ("pipelines.cli_serve", "add_serve_command"),
    ("flows.cli_flow", "add_flow_commands"),
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
