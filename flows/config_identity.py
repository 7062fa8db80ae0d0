"""The config hash a run will render under, when the flow can know it cheaply.

A story's folder is `{out}/{story_id}/{config_hash}/`, and the hash covers everything
that changes pixels, including what the loaded pipeline reports (model id, dtype, sizes,
sampling defaults). The flow computes it with the very code the story workers use
(`cli_render.config_from_args` on a loaded pipeline and scorers), which is cheap only for
the `tiny` preset. For real checkpoints the pipeline (two 14B experts) is not loaded in
the flow's process, and on a cluster the workers' device (hence default dtype) is not the
flow's - so there the hash is unknown here (None): the flow then hands every valid script to the batch, which drops
committed stories itself from the commit markers, with its workers' hash.
"""
from __future__ import annotations

import functools

from flows.render_options import parse_model_args

CHEAP_PRESETS = ("tiny",)


def config_hash_for_argv(argv: list[str], same_machine: bool = True) -> str | None:
    """The config hash for these `storymem` flags, or None when it is not cheap to know
    here (real weights, or workers on another machine: `same_machine=False`)."""
    if not same_machine:
        return None
    return _config_hash(tuple(argv))


@functools.lru_cache(maxsize=8)
def _config_hash(argv: tuple[str, ...]) -> str | None:
    args = parse_model_args(list(argv))
    if args.preset not in CHEAP_PRESETS:
        return None
    from storymem_model.cli_render import (config_from_args, pipeline_from_args,
                                           references_from_args, scorers_from_args)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline = pipeline_from_args(args)
        scorers = scorers_from_args(args)
        return config_from_args(args, pipeline, scorers, references_from_args(args)).config_hash()
    finally:
        torch.set_num_threads(threads)
