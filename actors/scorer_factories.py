"""What each scorer actor builds inside itself: CLIP embedder, aesthetic gate, HPSv3 gate.

Each factory is a plain picklable function run in the actor's constructor. The CLIP actor
loads only CLIP and the aesthetic actor only its own CLIP ViT-L/14 + head (the same models
`storymem_model.cli_render.scorers_from_args` builds, split by actor). A factory returns
the model, or `(model, info)` where `info` (e.g. the gate threshold) is sent to the driver.

`build_hps_gate` runs under the HPS environment's interpreter (Ray runtime_env
`py_executable`): it imports only numpy and storymem_model.scorers.hps_model.
"""
from __future__ import annotations

import argparse
from typing import Sequence

HPS_GATE_THRESHOLD = 3.0  # the reference release's HPSv3 keyframe gate (facts §7)


def build_embedder(model_args: argparse.Namespace):
    """The CLIP `ImageEmbedder` the model flags name (tiny random, or a checkpoint)."""
    device = _device()
    if getattr(model_args, "clip_checkpoint", None):
        from storymem_model.scorers.clip_embedder import OpenClipEmbedder

        return OpenClipEmbedder(model_args.clip_model, model_args.clip_checkpoint, device=device)
    from storymem_model.cli_render import scorers_from_args

    return scorers_from_args(model_args).embedder


def build_aesthetic_gate(model_args: argparse.Namespace):
    """The aesthetic `ImageScorer` gate and its threshold, as `scorers_from_args` picks."""
    device = _device()
    if getattr(model_args, "clip_checkpoint", None):
        from storymem_model.scorers import AESTHETIC_GATE_THRESHOLD, ScorerError
        from storymem_model.scorers.aesthetic_scorer import AestheticScorer

        if not model_args.aesthetic_head or not model_args.aesthetic_clip_checkpoint:
            raise ScorerError("the aesthetic gate needs --aesthetic-head and "
                              "--aesthetic-clip-checkpoint (or use the HPSv3 gate)")
        gate = AestheticScorer.from_checkpoint(
            model_args.aesthetic_head, model_args.aesthetic_clip_checkpoint, device=device)
        threshold = model_args.gate_threshold
        return gate, {"gate_threshold": float(
            AESTHETIC_GATE_THRESHOLD if threshold is None else threshold)}
    from storymem_model.cli_render import scorers_from_args

    scorers = scorers_from_args(model_args)
    info = {"gate_threshold": float(scorers.gate_threshold)}
    if scorers.gate_scores_embeddings:
        # The gate's head sits on the very CLIP the CLIP pool serves (tiny preset): as in
        # process, frames are embedded once and the gate scores the embeddings.
        info["embeds_with_clip"] = scorers.embedder.name
    return scorers.gate, info


class HPSGate:
    """`ImageScorer` over HPSv3Model (runs inside the HPS environment)."""

    default_threshold = HPS_GATE_THRESHOLD

    def __init__(self, model, name: str):
        self._model = model
        self.name = name

    def score_images(self, images, prompts: Sequence[str] | None = None):
        return self._model.score(images, prompts)


def build_hps_gate(checkpoint: str, base_model: str, threshold: float | None = None,
                   dtype: str | None = None):
    """HPSv3 through the real hpsv3 package (call it under the HPS env's interpreter)."""
    from storymem_model.scorers.hps_model import HPSv3Model

    model = HPSv3Model(checkpoint, base_model, device=_device(), dtype=dtype)
    info = {"gate_threshold": float(HPS_GATE_THRESHOLD if threshold is None else threshold)}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    # "hpsv3", as the in-process HPSScorer names itself: same gate, same config hash.
    return HPSGate(model, "hpsv3"), info


def _device() -> str:
    """The GPU Ray gave this actor, else the CPU."""
    try:
        import ray

        return "cuda" if ray.get_gpu_ids() else "cpu"
    except Exception:
        return "cpu"
