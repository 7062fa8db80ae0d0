"""Training samples are built by the inference code path (no Ray): `y`, mask and RoPE
positions equal what the pipeline feeds its expert for the same clip and memory; flow
matching draws stay in each expert's range; LoRA files come out in the released format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import test_train_support as support
from storymem_model import conditioning as cond
from storymem_model.training import encoding, lora as lora_files, samples
from storymem_model.training.clips import decode_clip
from storymem_model.training.prepared import PreparedClip, shard_bytes, shard_row

H, W, F = support.HEIGHT, support.WIDTH, support.NUM_FRAMES


@pytest.fixture(scope="module")
def clips():
    """Two decoded training clips: the shot and a clip whose frames 0 and 6 are the memory."""
    shot = decode_clip(support.clip_bytes(0, 1), num_frames=F, fps=support.FPS, height=H, width=W)
    other = decode_clip(support.clip_bytes(2, 0), num_frames=F, fps=support.FPS, height=H, width=W)
    return shot, other


@pytest.fixture(scope="module")
def prepared(pipe, clips):
    """The shot as prepare stores it (through a shard's bytes), memory = the other clip's
    keyframes 0 and 6, encoded as prepare encodes them."""
    import io

    import pyarrow.parquet as pq

    shot, other = clips
    memory = encoding.encode_clip(pipe, other, [0, 6], "the other clip").keyframes
    latents = encoding.encode_clip(pipe, shot, [], "a red room, the camera pans")
    row = shard_row(clip_id="shot", clip_uri="mem://shot", caption="a red room, the camera pans", group_id="g",
                    order=1, position=0, keyframe_indices=[], latents=latents, memory=memory,
                    memory_sources=["other:0", "other:6"])
    stored = pq.read_table(io.BytesIO(shard_bytes([row]))).to_pylist()[0]
    return PreparedClip.from_row(stored), encoding.zero_condition(pipe, F, H, W)


def _inference_inputs(pipe, prompt, **kwargs):
    """(model input, temporal RoPE positions) of the first expert evaluation of a render."""
    seen = {}

    def hook(module, args, kw):
        if "input" not in seen:
            seen["input"] = (args[0] if args else kw["hidden_states"]).detach().clone()
            seen["positions"] = module.rope.positions.clone()

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe.generate_shot_latents(prompt, seed=5, height=H, width=W, num_frames=F, num_inference_steps=1, **kwargs)
    finally:
        handle.remove()
    return seen["input"][0], seen["positions"]


@pytest.mark.parametrize("variant,rope_shift,fix_mem", [("m2v", 5, None), ("mi2v", 5, None), ("mm2v", 5, None),
                                                        ("mi2v", None, 1)])
def test_sample_inputs_equal_the_inference_inputs(pipe, clips, prepared, variant, rope_shift, fix_mem):
    shot, other = clips
    clip, zero = prepared
    given = {"m2v": {}, "mi2v": {"first_frame": shot[0]}, "mm2v": {"motion_frames": shot[:cond.MOTION_FRAMES]}}
    model_input, positions = _inference_inputs(
        pipe, "a red room, the camera pans", memory=np.stack([other[0], other[6]]), rope_shift=rope_shift,
        fix_mem=fix_mem, **given[variant])
    sample = samples.build_sample(clip, zero, num_frames=F, text_length=pipe.prompt_encoder.text_length,
                                  variant=variant, memory=[0, 1], rope_shift=rope_shift, fix_mem=fix_mem)
    y = model_input[cond.LATENT_CHANNELS:]
    assert y.shape == sample.inputs.y.shape == (20, 2 + 3, 4, 4)
    torch.testing.assert_close(sample.inputs.y, y, rtol=0, atol=0)  # value by value, mask and latents
    assert torch.equal(sample.inputs.positions, positions)
    assert sample.inputs.positions.tolist() == ([-10, -5, 0, 1, 2] if rope_shift else [0, 1, 2, 3, 4])
    mask = sample.inputs.y[:4, :, 0, 0]
    expected_given = {"m2v": 0, "mi2v": 1, "mm2v": 5}[variant]
    assert torch.equal(mask, cond.condition_mask(2, F, expected_given, 1, 1, fix_mem)[:, :, 0, 0])
    # The clean latent is laid out as the noise is: memory latents first, then the clip.
    assert torch.equal(sample.clean[:, :2], clip.memory_latents[:, :, 0].permute(1, 0, 2, 3))
    assert torch.equal(sample.clean[:, 2:], clip.clip_latent)
    # The caption embedding is the pipeline's, zero padding restored.
    assert torch.equal(sample.text, pipe.prompt_encoder.encode(["a red room, the camera pans"], pipe.device)[0])


def test_inference_and_training_call_the_one_input_builder(pipe, prepared, monkeypatch):
    """`conditioning.m2v_inputs` is the one code path: both callers go through it."""
    clip, zero = prepared
    calls = []
    real = cond.m2v_inputs

    def recording(*args, **kwargs):
        calls.append(kwargs.get("rope_shift", args[4] if len(args) > 4 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(cond, "m2v_inputs", recording)
    pipe.generate_shot_latents("a shot", seed=1, height=H, width=W, num_frames=F, num_inference_steps=1, rope_shift=3)
    samples.build_sample(clip, zero, num_frames=F, text_length=8 + clip.caption_embedding.shape[0], variant="m2v",
                         memory=[], rope_shift=4)
    assert calls == [3, 4]


def test_draws_follow_the_settings(prepared):
    clip, zero = prepared
    settings = samples.SampleSettings(max_memory=1, mi2v_prob=0.3, mm2v_prob=0.2, rope_shift=5, fix_mem=None,
                                      boundary_ratio=0.9, timestep_shift=4.0)
    from storymem_model.training.data_order import sample_generator

    drawn = {"high": [], "low": []}
    variants, memories = [], []
    for expert in drawn:
        for number in range(300):
            s = samples.draw_sample(clip, zero, num_frames=F, text_length=64, expert=expert, settings=settings,
                                    generator=sample_generator(0, expert, number))
            drawn[expert].append(s.sigma)
            variants.append(s.variant)
            memories.append(s.num_memory)
            assert s.timestep == pytest.approx(s.sigma * 1000)
            assert s.model_input.shape == (36, s.num_memory + 3, 4, 4)
    assert min(drawn["high"]) >= 0.9 and max(drawn["high"]) <= 1.0
    assert max(drawn["low"]) < 0.9 and min(drawn["low"]) >= 0.0
    assert np.mean(drawn["low"]) > 0.45  # shifted towards noise like Wan's timesteps (shift 4)
    share = {v: variants.count(v) / len(variants) for v in ("m2v", "mi2v", "mm2v")}
    assert share["mi2v"] == pytest.approx(0.3, abs=0.06) and share["mm2v"] == pytest.approx(0.2, abs=0.06)
    assert set(memories) == {0, 1}  # 0..max_memory, never more than the clip offers
    # One sample's draws depend on its seed and number only.
    a = samples.draw_sample(clip, zero, num_frames=F, text_length=64, expert="low", settings=settings,
                            generator=sample_generator(3, "low", 11))
    b = samples.draw_sample(clip, zero, num_frames=F, text_length=64, expert="low", settings=settings,
                            generator=sample_generator(3, "low", 11))
    assert torch.equal(a.model_input, b.model_input) and a.sigma == b.sigma
    # Flow matching as in Wan: x_t = (1 - s) x0 + s noise, target noise - x0.
    base = samples.build_sample(clip, zero, num_frames=F, text_length=64, variant="m2v", memory=[], rope_shift=5)
    noise = torch.randn(base.clean.shape, generator=torch.Generator().manual_seed(0))
    noised = samples.noised(base, 0.25, noise)
    torch.testing.assert_close(noised.model_input[:16], 0.75 * base.clean + 0.25 * noise)
    assert torch.equal(noised.target, noise - base.clean)


def test_lora_files_use_the_released_keys_and_scale(pipe):
    """A trained adapter saved in the released format loads through `load_pipeline`'s loader
    and makes the same update; alpha != rank is folded into B."""
    from storymem_model.lora_loading import convert_lora_state_dict
    from storymem_model.presets import TINY
    from storymem_model.training.experts import load_expert

    expert = load_expert(pipe_spec(), "high", torch.float32)
    rank, alpha = TINY.lora_rank, 2.0 * TINY.lora_rank
    lora_files.add_lora(expert, rank, alpha, seed=3)
    trainable = [n for n, p in expert.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 10 * TINY.num_layers and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for name, parameter in expert.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    trained = {n: p.detach().clone() for n, p in expert.named_parameters() if ".lora_" in n}
    state = lora_files.released_state(trained, rank, alpha)
    assert all(k.startswith("base_model.model.blocks.") for k in state) and len(state) == len(trained)
    assert "base_model.model.blocks.1.cross_attn.o.lora_B.weight" in state
    assert "base_model.model.blocks.0.ffn.2.lora_A.weight" in state
    fresh = load_expert(pipe_spec(), "high", torch.float32)
    converted, file_rank = convert_lora_state_dict(state, "mem", fresh, rank)
    assert file_rank == rank
    # the update the training adapter makes (scale alpha/sqrt(r)) == the loader's (r/sqrt(r))
    a = trained["blocks.0.attn1.to_q.lora_A.storymem.weight"]
    b = trained["blocks.0.attn1.to_q.lora_B.storymem.weight"]
    loaded_a = converted["blocks.0.attn1.to_q.lora_A.weight"]
    loaded_b = converted["blocks.0.attn1.to_q.lora_B.weight"]
    torch.testing.assert_close((b @ a) * alpha / rank ** 0.5, (loaded_b @ loaded_a) * rank / rank ** 0.5)
    zero = lora_files.zero_like_released(state)
    assert set(zero) == set(state) and all(not t.any() for t in zero.values())


def pipe_spec():
    from storymem_model.specs import ModelSpec

    return ModelSpec(preset="tiny")
