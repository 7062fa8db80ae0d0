"""The paper's "Wan2.2 independent shots" baseline: every shot generated on its own.

`IndependentShotsPipeline` wraps a loaded StoryMemPipeline for the story runner so the
runner's layout, resume and commit logic are reused unchanged, while each shot ignores the
memory bank and any previous frames: it is plain text-to-video (the T2V experts) when the
pipeline has them, else M2V with an empty memory. Render it with `transition="none"`.

Its `model_id` is the wrapped one plus "+independent", so the RenderConfig (and with it the
config hash and output folder) differs from the StoryMem render of the same script, and
the evaluation can label the row. The runner still selects keyframes and fills its memory
bank (unused by the shots): a small, honest overhead instead of a second runner.
"""
from __future__ import annotations

INDEPENDENT_SUFFIX = "+independent"


class IndependentShotsPipeline:
    """A StoryMemPipeline that generates every shot without memory or previous frames."""

    def __init__(self, pipeline):
        if str(pipeline.model_id).endswith(INDEPENDENT_SUFFIX):
            raise ValueError(f"pipeline {pipeline.model_id!r} is already wrapped")
        self._pipeline = pipeline
        self.model_id = f"{pipeline.model_id}{INDEPENDENT_SUFFIX}"

    @property
    def wrapped(self):
        return self._pipeline

    def generate_shot(self, prompt, memory=None, memory_latents=None, first_frame=None,
                      motion_frames=None, use_t2v=False, **kwargs):
        """Drop memory, first frame and motion frames; T2V whenever the model has it."""
        use_t2v = bool(getattr(self._pipeline, "has_t2v", False))
        return self._pipeline.generate_shot(prompt, use_t2v=use_t2v, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)
