"""Builds the pipeline, the scorers and the base RenderConfig from the `render` model flags.

The Serve deployments receive one `ModelFactory` (a picklable copy of the parsed flags) and
call it inside their replicas, so `storymem serve` takes exactly the flags of
`storymem render` (`add_model_arguments`) with the same meaning, and a story job renders with
the same RenderConfig - hence the same config hash and bytes - as `storymem render` would.
"""
from __future__ import annotations

import argparse


class ModelFactory:
    def __init__(self, args: argparse.Namespace):
        values = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
        # Server-wide reference images make no sense for shots/sessions (they bring their
        # own); render's --references flag is therefore ignored by the server.
        values["references"] = []
        self.args = argparse.Namespace(**values)

    def build_pipeline(self):
        from storymem_model.cli_render import pipeline_from_args

        return pipeline_from_args(self.args)

    def build_scorers(self):
        from storymem_model.cli_render import scorers_from_args

        return scorers_from_args(self.args)

    def base_config(self, pipeline, scorers, references=()):
        """The RenderConfig `storymem render` would use with these flags and references."""
        from storymem_model.cli_render import config_from_args

        return config_from_args(self.args, pipeline, scorers, list(references))

    def check_flags(self) -> None:
        """Raise ValueError (ConfigError) for unusable setting values before any replica
        loads a model, with the model's usual shot defaults standing in for the pipeline."""
        from types import SimpleNamespace

        from storymem_model.presets import REAL_SHOT, TINY

        shot = TINY.shot if self.args.preset == "tiny" else REAL_SHOT
        stand_in = SimpleNamespace(
            model_id="(not loaded yet)", default_height=shot.height, default_width=shot.width,
            default_num_frames=shot.num_frames, fps=shot.fps, default_sampling={})
        self.base_config(stand_in, None, [])
