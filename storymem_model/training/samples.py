"""One training sample: a prepared clip as the shot, memory from its group, a variant, and
the flow-matching noise (docs/training.md#samples).

The model inputs are built exactly as a render builds them: `conditioning.m2v_inputs`
(the 20-channel `y` with its mask and the temporal RoPE positions, memory at negative
positions) from the chosen memory latents and the clip's conditioning latents, and the
noisy latent is laid out by `conditioning.memory_then_shot` (memory first, then the shot).

Draws, all from the sample's own generator (so a sample depends only on the seed and its
position in the data order, never on the worker that draws it):

1. the variant: MI2V with `mi2v_prob` (first frame given), MM2V with `mm2v_prob` (first 5
   frames given), else M2V (nothing given);
2. the memory size k uniformly in 0..min(max_memory, candidates), then k of the clip's
   memory candidates, kept in group order;
3. the noise level sigma in the expert's range (high: sigma >= boundary, low: below),
   distributed as Wan's shifted timesteps: sigma = shift*u / (1 + (shift-1)*u) with u
   uniform over the range's preimage; the timestep is sigma x 1000;
4. Gaussian noise for every latent frame, memory included.

Flow matching as in Wan: x_t = (1 - sigma) x_0 + sigma * noise, the expert predicts the
velocity noise - x_0. The memory positions of the noisy input hold the noised memory
latents, and the loss covers them too: at inference the memory positions start as noise and
are denoised with the shot by the same scheduler, so the model is trained on what it sees
there (docs/training.md#what-the-memory-positions-hold).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from storymem_model import conditioning as cond
from storymem_model.shot_modes import ShotMode
from storymem_model.training.encoding import padded_caption
from storymem_model.training.prepared import PreparedClip

NUM_TRAIN_TIMESTEPS = 1000
# The shot modes a sample is drawn as (its variant); each gives the shot its own number of
# leading frames (`ShotMode.given_frames`), as at inference.
VARIANTS = (ShotMode.M2V, ShotMode.MI2V, ShotMode.MM2V)


@dataclass(frozen=True)
class SampleSettings:
    """The sample draws of a `FitSpec` (see there)."""

    max_memory: int
    mi2v_prob: float
    mm2v_prob: float
    rope_shift: int | None
    fix_mem: int | None
    boundary_ratio: float
    timestep_shift: float

    @classmethod
    def of(cls, spec) -> "SampleSettings":
        return cls(**{name: getattr(spec, name) for name in cls.__dataclass_fields__})


@dataclass
class TrainingSample:
    """A prepared clip turned into the expert's inputs (before noise)."""

    clean: torch.Tensor             # (16, M + f, h, w) memory latents, then the clip latent
    inputs: cond.M2VInputs          # y (20, M + f, h, w), RoPE positions, num_memory
    text: torch.Tensor              # (text_length, D)
    variant: str
    memory_sources: list[str]


@dataclass
class NoisedSample:
    """What one training forward takes and what it is compared with."""

    model_input: torch.Tensor  # (36, M + f, h, w) = concat(noisy latent, y)
    timestep: float            # sigma x 1000
    sigma: float
    target: torch.Tensor       # (16, M + f, h, w) = noise - clean
    positions: torch.Tensor    # temporal RoPE positions (M + f,)
    text: torch.Tensor         # (text_length, D)
    variant: str
    num_memory: int


def build_sample(clip: PreparedClip, zero_condition: torch.Tensor, *, num_frames: int, text_length: int,
                 variant: str, memory: list[int], rope_shift: int | None,
                 fix_mem: int | None = None) -> TrainingSample:
    """The inputs for `clip` as the shot, given its `variant` and the indices of its memory
    candidates to use (in order)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {[v.value for v in VARIANTS]}, got {variant!r}")
    mode = ShotMode(variant)
    condition = {ShotMode.M2V: zero_condition, ShotMode.MI2V: clip.mi2v_latent,
                 ShotMode.MM2V: clip.mm2v_latent}[mode]
    memory_latents = clip.memory_latents[list(memory)] if memory else None
    inputs = cond.m2v_inputs(memory_latents, condition, num_frames, mode.given_frames, rope_shift,
                             fix_mem=fix_mem)
    clean = cond.memory_then_shot(memory_latents, clip.clip_latent)
    return TrainingSample(clean=clean, inputs=inputs, text=padded_caption(clip.caption_embedding, text_length),
                          variant=variant, memory_sources=[clip.memory_sources[i] for i in memory])


def draw_variant(generator: torch.Generator, settings: SampleSettings) -> str:
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if u < settings.mi2v_prob:
        return ShotMode.MI2V.value
    if u < settings.mi2v_prob + settings.mm2v_prob:
        return ShotMode.MM2V.value
    return ShotMode.M2V.value


def draw_memory(generator: torch.Generator, available: int, max_memory: int) -> list[int]:
    count = int(torch.randint(0, min(available, max_memory) + 1, (), generator=generator))
    if count == 0:
        return []
    return sorted(torch.randperm(available, generator=generator)[:count].tolist())


def shifted_sigma(u: float, shift: float) -> float:
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshifted(sigma: float, shift: float) -> float:
    """The u with shifted_sigma(u, shift) == sigma."""
    return sigma / (shift - (shift - 1.0) * sigma)


def sigma_range(expert: str, boundary_ratio: float) -> tuple[float, float]:
    """[low, high) of the noise levels an expert serves (high noise: t >= boundary x 1000)."""
    if expert == "high":
        return float(boundary_ratio), 1.0
    if expert == "low":
        return 0.0, float(boundary_ratio)
    raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")


def draw_sigma(generator: torch.Generator, expert: str, settings: SampleSettings) -> float:
    low, high = sigma_range(expert, settings.boundary_ratio)
    shift = float(settings.timestep_shift)
    u_low, u_high = unshifted(low, shift), unshifted(high, shift)
    u = u_low + (u_high - u_low) * float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(max(shifted_sigma(u, shift), low), high)


def noised(sample: TrainingSample, sigma: float, noise: torch.Tensor) -> NoisedSample:
    clean = sample.clean
    noisy = (1.0 - sigma) * clean + sigma * noise
    return NoisedSample(
        model_input=torch.cat([noisy, sample.inputs.y.to(noisy)], dim=0), timestep=sigma * NUM_TRAIN_TIMESTEPS,
        sigma=sigma, target=noise - clean, positions=sample.inputs.positions, text=sample.text,
        variant=sample.variant, num_memory=sample.inputs.num_memory)


def draw_sample(clip: PreparedClip, zero_condition: torch.Tensor, *, num_frames: int, text_length: int,
                expert: str, settings: SampleSettings, generator: torch.Generator) -> NoisedSample:
    """Every random choice of one sample, in a fixed order, from `generator`."""
    variant = draw_variant(generator, settings)
    memory = draw_memory(generator, len(clip.memory_latents), settings.max_memory)
    sample = build_sample(clip, zero_condition, num_frames=num_frames, text_length=text_length,
                          variant=variant, memory=memory, rope_shift=settings.rope_shift,
                          fix_mem=settings.fix_mem)
    sigma = draw_sigma(generator, expert, settings)
    noise = torch.randn(sample.clean.shape, generator=generator)
    return noised(sample, sigma, noise)
