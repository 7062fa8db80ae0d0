"""The one place keyframe scorers are built from a `ScorerSpec`.

* `build_embedder(spec)`: the CLIP `ImageEmbedder` (tiny random CLIP or a checkpoint);
* `build_gate(spec, embedder=None)`: the quality gate `ImageScorer` - the LAION aesthetic
  predictor (its own CLIP ViT-L/14; the tiny head sits on the tiny CLIP, shared when
  `embedder` is given) or HPSv3 (in process when this interpreter is the HPS
  environment, else through the HPS worker subprocess);
* `build_keyframe_scorers(spec)`: both, as the story runner takes them.

The story runner, the Ray scorer actors (CLIP actors call only `build_embedder`, gate actors
only `build_gate`) and the Serve scorer deployments all call these, so the same spec
always gives the same models, named by their content ids (`model_identity.scorer_identity`),
which go into the config hash.
"""
from __future__ import annotations

from storymem_model.model_identity import embedder_identity, gate_identity
from storymem_model.scorers.base import ImageEmbedder, ImageScorer, KeyframeScorers, ScorerError
from storymem_model.specs import ScorerSpec


def _device(spec: ScorerSpec) -> str:
    return spec.device or "cpu"


def build_embedder(spec: ScorerSpec) -> ImageEmbedder:
    from storymem_model.scorers.clip_embedder import OpenClipEmbedder

    # "reference" preprocessing: CLIP squashes the smart-resized frames bilinear, no antialias
    resize = "squash_bilinear" if spec.keyframe_preprocess == "reference" else "squash"
    if spec.preset == "tiny":
        embedder = OpenClipEmbedder.tiny(device=_device(spec), resize_mode=resize)
    else:
        embedder = OpenClipEmbedder(spec.clip_model, spec.clip_checkpoint,
                                    device=_device(spec), resize_mode=resize)
    embedder.name = embedder_identity(spec)
    return embedder


def build_gate(spec: ScorerSpec, embedder: ImageEmbedder | None = None) -> ImageScorer:
    """The gate the spec names; the tiny aesthetic head uses `embedder` when given (else
    its own tiny CLIP)."""
    gate_id, _ = gate_identity(spec)  # refuses a spec without a gate, naming what is missing
    if spec.uses_hps:
        gate = _hps_gate(spec)
    elif spec.preset == "tiny":
        from storymem_model.scorers.aesthetic_scorer import AestheticScorer

        gate = AestheticScorer.tiny(embedder if embedder is not None
                                    else build_embedder(spec))
    else:
        from storymem_model.scorers.aesthetic_scorer import AestheticScorer

        gate = AestheticScorer.from_checkpoint(
            spec.aesthetic_head, spec.aesthetic_clip_checkpoint, spec.aesthetic_clip_model,
            device=_device(spec))
    gate.name = gate_id
    return gate


def _hps_gate(spec: ScorerSpec) -> ImageScorer:
    from storymem_model.scorers.hps_env_check import in_hps_environment

    if in_hps_environment():
        from storymem_model.scorers.hps_model import HPSv3Model

        return _HPSModelGate(HPSv3Model(spec.hps_checkpoint, spec.hps_base_model,
                                        device=_device(spec)))
    from storymem_model.scorers.hps_scorer import HPSScorer

    return HPSScorer(spec.hps_checkpoint, spec.hps_base_model, python=spec.hps_python,
                     device=_device(spec))


class _HPSModelGate:
    """`ImageScorer` over an in-process HPSv3Model (inside the HPS environment)."""

    def __init__(self, model):
        self._model = model

    def score_images(self, images, prompts=None):
        from storymem_model.scorers.base import check_image_batch, check_prompts
        from storymem_model.scorers.hps_scorer import score_in_fixed_batches

        batch = check_image_batch(images)
        return score_in_fixed_batches(self._model.score, batch,
                                      check_prompts(prompts, len(batch)))


def build_keyframe_scorers(spec: ScorerSpec) -> KeyframeScorers:
    """Embedder, gate and threshold for keyframe selection (tiny: the gate shares the
    embedder's CLIP, so frames are embedded once)."""
    problems = spec.problems_for_keyframes()
    if problems:  # before loading anything
        raise ScorerError("; ".join(problems))
    embedder = build_embedder(spec)
    gate = build_gate(spec, embedder if spec.preset == "tiny" else None)
    return KeyframeScorers(embedder=embedder, gate=gate, gate_threshold=gate_identity(spec)[1])
