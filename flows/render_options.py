"""Flow parameters for the model and render settings, as `storymem` command-line flags.

Flows take the same settings as `storymem render` / `storymem batch`: `preset` or model
folders, plus `render_args` for everything else (`["--transition", "mm2v", "--seed",
"7"]`). They are turned into one argv list that is parsed by the very parser of the CLI
(`storymem_model.cli_render.add_model_arguments`), so a bad flag fails the flow before
any work, with argparse's message, and the cluster path passes the same flags verbatim
to `storymem batch` in the Ray job.
"""
from __future__ import annotations

import argparse
import contextlib
import io


class RenderOptionsError(ValueError):
    """Model/render settings the `storymem` parser rejects; carries its message."""


def model_argv(preset: str | None = None, model_dir: str | None = None,
               t2v_model_dir: str | None = None, lora_dir: str | None = None,
               render_args: list[str] | None = None) -> list[str]:
    """The `storymem` flags for these settings (preset or model folders + extra flags)."""
    if preset and model_dir:
        raise RenderOptionsError("give either preset or model_dir, not both")
    if not preset and not model_dir:
        raise RenderOptionsError(
            "no model: give preset (e.g. 'tiny') or model_dir (a Wan2.2 I2V folder)")
    argv: list[str] = []
    if preset:
        argv += ["--preset", str(preset)]
    if model_dir:
        argv += ["--model-dir", str(model_dir)]
    if t2v_model_dir:
        argv += ["--t2v-model-dir", str(t2v_model_dir)]
    if lora_dir:
        argv += ["--lora-dir", str(lora_dir)]
    extra = list(render_args or [])
    if not all(isinstance(a, str) for a in extra):
        raise RenderOptionsError(f"render_args must be a list of strings, got {extra!r}")
    return argv + extra


def parse_model_args(argv: list[str]) -> argparse.Namespace:
    """Parse with the CLI's own model/render arguments; RenderOptionsError on bad flags."""
    from storymem_model.cli_render import add_model_arguments

    parser = argparse.ArgumentParser(prog="storymem flow", add_help=False,
                                     exit_on_error=False)
    add_model_arguments(parser)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args, unknown = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        message = stderr.getvalue().strip() or str(exc)
        raise RenderOptionsError(f"bad model/render settings {argv}: {message}") from None
    if unknown:
        raise RenderOptionsError(f"unknown model/render flags {unknown} in {argv}")
    return args
