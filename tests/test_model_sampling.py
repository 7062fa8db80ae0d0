"""Sampling: defaults, sigma grids, expert switch, batched vs sequential CFG, shot seeds."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from storymem_model.sampling import M2V_SAMPLING, T2V_SAMPLING, SamplingConfig, make_scheduler
from storymem_model.seeds import shot_seed
from storymem_model.text_encoding import WAN_NEGATIVE_PROMPT


def shifted(sigmas, shift):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def test_reference_defaults():
    assert (M2V_SAMPLING.num_inference_steps, M2V_SAMPLING.shift, M2V_SAMPLING.boundary_ratio) == (40, 4.0, 0.9)
    assert (M2V_SAMPLING.guidance_scale, M2V_SAMPLING.guidance_scale_2) == (3.5, 3.5)
    assert (T2V_SAMPLING.shift, T2V_SAMPLING.boundary_ratio) == (12.0, 0.875)
    # T2V first shot as the reference story pipeline runs it: guidance 3.5 for both experts
    assert (T2V_SAMPLING.guidance_scale, T2V_SAMPLING.guidance_scale_2) == (3.5, 3.5)
    assert M2V_SAMPLING.cfg_mode == "batched"
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽")


def test_sigma_grids():
    reference = make_scheduler(M2V_SAMPLING)
    expected = shifted(np.linspace(0.999, 0, 41)[:-1], 4.0)
    np.testing.assert_allclose(reference.sigmas[:-1].numpy(), expected, atol=1e-6)
    assert reference.sigmas[-1] == 0
    plain = make_scheduler(M2V_SAMPLING.updated(reference_sigmas=False))
    gap = np.abs(plain.sigmas[:-1].numpy() - expected).max()
    assert 1e-4 < gap < 4e-3  # diffusers' own grid differs slightly (docs/method.md#sampling)


def test_unknown_and_bad_sampling_options():
    with pytest.raises(TypeError, match="unknown sampling option"):
        SamplingConfig().updated(guidance=2)
    for bad in (dict(num_inference_steps=0), dict(boundary_ratio=1.5), dict(shift=0), dict(cfg_mode="x")):
        with pytest.raises(ValueError):
            SamplingConfig().updated(**bad)


class CallCounter:
    def __init__(self, **experts):
        self.calls, self.handles = [], []
        for name, expert in experts.items():
            self.handles.append(expert.register_forward_pre_hook(
                lambda module, args, kwargs, name=name: self.calls.append((name, int(args[1][0]), args[0].shape[0])),
                with_kwargs=True))

    def close(self):
        for handle in self.handles:
            handle.remove()


def run_counted(pipe, t2v=False, **kwargs):
    experts = ("t2v_transformer", "t2v_transformer_2") if t2v else ("transformer", "transformer_2")
    counter = CallCounter(high=getattr(pipe, experts[0]), low=getattr(pipe, experts[1]))
    try:
        pipe.generate_shot_latents("a quiet street", seed=0, use_t2v=t2v, **kwargs)
    finally:
        counter.close()
    return counter.calls


@pytest.mark.parametrize("t2v, boundary", [(False, 0.9), (True, 0.875)])
def test_experts_switch_at_the_boundary(pipe, t2v, boundary):
    calls = run_counted(pipe, t2v=t2v, num_inference_steps=12)
    assert len(calls) == 12 and all(batch == 2 for *_, batch in calls)  # one batched CFG forward per step
    for name, t, _ in calls:
        assert name == ("high" if t >= boundary * 1000 else "low")
    names = [name for name, *_ in calls]
    assert names == sorted(names)  # all high-noise steps come first ('high' < 'low')
    assert "high" in names and "low" in names


def test_sequential_cfg_runs_two_passes_and_no_cfg_one(pipe):
    calls = run_counted(pipe, num_inference_steps=3, cfg_mode="sequential")
    assert len(calls) == 6 and all(batch == 1 for *_, batch in calls)
    calls = run_counted(pipe, num_inference_steps=3, guidance_scale=1.0, guidance_scale_2=1.0)
    assert len(calls) == 3 and all(batch == 1 for *_, batch in calls)


def test_batched_and_sequential_cfg_agree(pipe):
    memory = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    batched = pipe.generate_shot_latents("a quiet street", memory=memory, seed=4, cfg_mode="batched").latents
    sequential = pipe.generate_shot_latents("a quiet street", memory=memory, seed=4, cfg_mode="sequential").latents
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
    a = pipe.generate_shot("a quiet street", memory=memory, seed=4, cfg_mode="batched")
    b = pipe.generate_shot("a quiet street", memory=memory, seed=4, cfg_mode="sequential")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_guidance_and_negative_prompt_matter(pipe):
    base = pipe.generate_shot_latents("a quiet street", seed=2).latents
    other_guidance = pipe.generate_shot_latents("a quiet street", seed=2, guidance_scale=6.0).latents
    other_negative = pipe.generate_shot_latents("a quiet street", seed=2, negative_prompt="blurry").latents
    assert not torch.allclose(base, other_guidance) and not torch.allclose(base, other_negative)


def test_progress_is_reported_per_step(pipe):
    seen = []
    pipe.generate_shot("a quiet street", num_inference_steps=3, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_shot_seeds_never_repeat_in_a_story():
    for story_seed in (0, 1, 42, 2**40 + 5):
        seeds = [shot_seed(story_seed, scene, shot) for scene, shot in itertools.product(range(1, 101), range(1, 51))]
        assert len(set(seeds)) == len(seeds)
        assert all(0 <= s < 2**63 for s in seeds)
    assert shot_seed(7, 2, 3) == shot_seed(7, 2, 3)
    assert shot_seed(7, 1, 1) != shot_seed(8, 1, 1)
    assert shot_seed(0, 1, 2) != shot_seed(0, 2, 1)  # the reference's base + shot index repeats these


@pytest.mark.parametrize("args", [(0, 0, 1), (0, 1, 0), (-1, 1, 1), (0, 1.0, 1), (0, 1, 70000), ("7", 1, 1)])
def test_shot_seed_refuses_bad_numbers(args):
    with pytest.raises((ValueError, TypeError)):
        shot_seed(*args)
