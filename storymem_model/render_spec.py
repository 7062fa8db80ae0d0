"""`RenderSpec`: everything a host needs to render stories, resolved once at the edge.

    ModelSpec + ScorerSpec + RenderSettings  --resolve_render_spec-->  RenderSpec
                                                                      (model, scorers,
                                                                       config, references)

Resolution reads no weights: model and scorer ids come from their files' content
(`model_identity`), shot geometry and sampling defaults from `presets` and `sampling`,
reference images are read once to hash their pixels. The result carries the resolved
`RenderConfig`, hence the config hash, so a planner knows every story's output folder
before any model loads, and every host (the in-process runner, a Ray story worker, a Serve
replica) renders with exactly that config: when it loads the model it checks the loaded
ids against `config` (`runner.StoryRunner`).

Without memory (`RenderSettings.memory=False`) no keyframe is selected, so no scorers are
needed: `scorers` is None and the config's scorer ids are empty.
"""
from __future__ import annotations

from dataclasses import dataclass

from storymem_model.model_identity import model_identity, scorer_identity
from storymem_model.render_config import ModelDefaults, RenderConfig
from storymem_model.spec_json import Spec
from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec


class ReferenceImageError(ValueError):
    """A reference image that cannot be read; names the URI."""


@dataclass(frozen=True)
class RenderSpec(Spec):
    """A resolved render: the model and scorers to load, the config every shot uses, and the
    MR2V reference image URIs (their pixel hashes are `config.references_sha256`)."""

    model: ModelSpec
    config: RenderConfig
    scorers: ScorerSpec | None = None
    references: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        out = []
        if not self.model.is_resolved:
            out.append("model device and dtype must be resolved (ModelSpec.resolved)")
        if self.config.memory and self.scorers is None:
            out.append("rendering with memory needs keyframe scorers")
        if len(self.references) != len(self.config.references_sha256):
            out.append("references and config.references_sha256 differ in length")
        return out

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()


def default_steps(model: ModelSpec) -> int:
    """The model's standard step count (40; the tiny preset's 4)."""
    from storymem_model.presets import REAL_SHOT, TINY

    return (TINY.shot if model.preset == "tiny" else REAL_SHOT).num_inference_steps


def with_sampling_preset(spec: "RenderSpec", preset: str) -> RenderConfig:
    """The spec's config rendering with another sampling preset: that preset's M2V sampling
    replaces the config's (overrides given for the other preset do not carry over; T2V
    sampling is unchanged). No file is read."""
    from storymem_model.sampling import preset_sampling

    if preset == spec.config.sampling_preset:
        return spec.config
    return spec.config.replace(sampling_preset=preset, sampling=preset_sampling(
        preset, default_steps(spec.model)).as_dict())


def model_defaults(model: ModelSpec, sampling_preset: str = "standard") -> ModelDefaults:
    """The ids, dtype, geometry, kernels and (preset) sampling defaults of a model, known
    before it loads."""
    from storymem_model.presets import REAL_SHOT, TINY
    from storymem_model.sampling import T2V_SAMPLING, preset_sampling

    if not model.is_resolved:
        raise ValueError("model_defaults needs a resolved ModelSpec (device and dtype)")
    identity = model_identity(model)
    shot = TINY.shot if model.preset == "tiny" else REAL_SHOT
    steps = default_steps(model)
    return ModelDefaults(
        model_id=identity.model_id, lora_id=identity.lora_id,
        t2v_model_id=identity.t2v_model_id, dtype=model.dtype, height=shot.height,
        width=shot.width, num_frames=shot.num_frames, fps=shot.fps,
        sampling=preset_sampling(sampling_preset, steps).as_dict(),
        t2v_sampling=T2V_SAMPLING.updated(num_inference_steps=steps).as_dict()
        if identity.has_t2v else None,
        distill_lora_id=identity.distill_lora_id, storage_dtype=model.storage_dtype,
        attention_backend=model.attention_backend, compiled=model.compile)


def resolve_render_spec(model: ModelSpec, scorers: ScorerSpec | None,
                        settings: RenderSettings, *, accelerator: bool | None = None
                        ) -> RenderSpec:
    """Resolve the specs into a RenderSpec (reads model/scorer file headers and the
    reference images; never loads weights). `accelerator`: whether the rendering host
    has a GPU (decides the default device/dtype); None keeps what `model` says (it must
    then be resolved already)."""
    if accelerator is not None:
        model = model.resolved(accelerator)
    if not settings.memory:
        scorers = None
    elif scorers is None:
        raise ValueError("rendering with memory needs keyframe scorers (a ScorerSpec); "
                         "only memory=False renders without them")
    elif model.device and not scorers.device:
        scorers = scorers.with_device(model.device)
    references = load_references(settings.references)
    scorer_values = {}
    if scorers is not None:
        identity = scorer_identity(scorers)
        scorer_values = {"embedder_id": identity.embedder_id, "gate_id": identity.gate_id,
                         "gate_threshold": identity.gate_threshold,
                         "keyframe_preprocess": scorers.keyframe_preprocess}
    from storymem_model.images import images_sha256

    config = RenderConfig.assemble(
        model_defaults(model, settings.sampling_preset), settings.sampling.given(),
        settings.t2v_sampling.given(), sampling_preset=settings.sampling_preset,
        fix_mem=settings.fix_mem, transition=settings.transition, seed=settings.seed, memory=settings.memory,
        max_memory=settings.max_memory, memory_sink=settings.memory_sink,
        rope_shift=settings.rope_shift, prompt_aware_memory=settings.prompt_aware_memory,
        negative_prompt=settings.negative_prompt,
        keyframe_threshold=settings.keyframe_threshold,
        max_keyframes=settings.max_keyframes, height=settings.height, width=settings.width,
        num_frames=settings.num_frames, references_sha256=images_sha256(references),
        **scorer_values)
    if settings.rope_shift is None:  # None is a choice here (contiguous), not "default"
        config = config.replace(rope_shift=None)
    return RenderSpec(model=model, config=config, scorers=scorers,
                      references=tuple(settings.references))


def load_references(uris) -> list:
    """The reference images at `uris` as (H, W, 3) uint8 arrays, in order."""
    from PIL import UnidentifiedImageError

    from storymem_model import storage
    from storymem_model.images import png_image

    images = []
    for uri in uris:
        try:
            images.append(png_image(storage.read_bytes(uri)))
        except FileNotFoundError:
            raise ReferenceImageError(f"reference image {uri} not found") from None
        except (UnidentifiedImageError, OSError, storage.StorageError) as exc:
            raise ReferenceImageError(f"reference image {uri} cannot be read: {exc}") from None
    return images
