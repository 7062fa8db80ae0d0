"""Render the validation story with a LoRA pair and score its cross-shot consistency.

The story goes through the same runner as `storymem render` (`runner.open_runner` on a
resolved `RenderSpec` whose model carries the LoRA folder), so the numbers are those a
render with that LoRA gets; consistency is `storymem eval`'s metric
(`evaluation.story_eval.story_consistency_for_render`) with the validation's video-text
encoder (ViCLIP, or the tiny one on the tiny preset).
"""
from __future__ import annotations

import time

from storymem_model.specs import ModelSpec
from storymem_model.training.records import ValidationRow
from storymem_model.training.specs import ValidationSpec


def validate_lora(validation: ValidationSpec, model: ModelSpec, lora_dir: str, out_uri: str, *,
                  step: int, expert: str) -> ValidationRow:
    """Render `validation.script` into `out_uri` with the LoRA pair in the local folder
    `lora_dir` on `model` (resolved), and score it."""
    from storymem_model.evaluation.encoder_factory import build_video_encoder
    from storymem_model.evaluation.story_eval import story_consistency_for_render
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.runner import open_runner
    from storymem_model.story_script import load_script

    started = time.perf_counter()
    spec = resolve_render_spec(model.replace(lora_dir=lora_dir), validation.scorers, validation.settings)
    result = open_runner(spec).render(load_script(validation.script), out_uri, progress=False)
    encoder = build_video_encoder(validation.video_encoder, device=model.device)
    numbers = story_consistency_for_render(result.story_uri, encoder)
    return ValidationRow(step=int(step), expert=expert, story_uri=result.story_uri,
                         consistency_all_pairs=float(numbers["consistency_all_pairs"]),
                         consistency_top10=float(numbers["consistency_top10"]),
                         num_shot_pairs=int(numbers["num_shot_pairs"]),
                         seconds=time.perf_counter() - started)
