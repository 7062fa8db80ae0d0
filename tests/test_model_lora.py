"""StoryMem LoRA in the released format: rsLoRA scale, both experts, strength, fuse, refusals."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import storymem_model
from model_folders import ORIGINAL_TO_DIFFUSERS, released_lora_state, write_lora_states
from storymem_model.model_identity import lora_files, lora_identity
from storymem_model.lora_loading import LoraLoadError, load_storymem_lora
from storymem_model.presets import TINY

RANK = TINY.lora_rank


def released_state_dict(transformer, seed: int, rank: int = RANK) -> dict[str, torch.Tensor]:
    return released_lora_state(transformer, seed, rank)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return storymem_model.load_pipeline("tiny")


@pytest.fixture(scope="module")
def lora_states(base):
    return released_state_dict(base.transformer, 1), released_state_dict(base.transformer_2, 2)


def write_pair(folder, states, suffix=".pth"):
    return write_lora_states(folder, states, suffix)


def expected_delta(state, block, original, scale):
    key = f"base_model.model.blocks.{block}.{original}"
    return scale * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fused_weight_change_is_rslora_scaled(base, lora_states, tmp_path, suffix):
    folder = write_pair(tmp_path / "lora", lora_states, suffix)
    pipe = storymem_model.load_pipeline("tiny", lora=folder, fuse_lora=True)
    scale = RANK / math.sqrt(RANK)  # alpha = r with rsLoRA: alpha / sqrt(r), not alpha / r = 1
    for expert, plain, state in ((pipe.transformer, base.transformer, lora_states[0]),
                                 (pipe.transformer_2, base.transformer_2, lora_states[1])):
        fused, original = dict(expert.named_modules()), dict(plain.named_modules())
        for block in range(expert.config.num_layers):
            for name, target in ORIGINAL_TO_DIFFUSERS.items():
                change = fused[f"blocks.{block}.{target}"].weight - original[f"blocks.{block}.{target}"].weight
                torch.testing.assert_close(change, expected_delta(state, block, name, scale),
                                           atol=1e-5, rtol=1e-4)
    # the id is the pair's content (tests/test_model_identity.py), the same for a copy
    assert pipe.lora_id == lora_identity(*lora_files(folder))
    assert pipe.lora_id.startswith("storymem-lora:")


def test_unfused_adapter_output_and_strength(base, lora_states, tmp_path):
    folder = write_pair(tmp_path / "lora", lora_states)
    strength = 0.5
    pipe = storymem_model.load_pipeline("tiny", lora=folder, lora_strength=strength)
    scale = strength * RANK / math.sqrt(RANK)
    x = torch.randn(3, pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim)
    for expert, plain, state in ((pipe.transformer, base.transformer, lora_states[0]),
                                 (pipe.transformer_2, base.transformer_2, lora_states[1])):
        adapted, original = dict(expert.named_modules()), dict(plain.named_modules())
        for block in range(expert.config.num_layers):
            for name, target in ORIGINAL_TO_DIFFUSERS.items():
                layer, reference = adapted[f"blocks.{block}.{target}"], original[f"blocks.{block}.{target}"]
                inputs = x if reference.in_features == x.shape[1] else torch.randn(3, reference.in_features)
                with torch.no_grad():
                    change = layer(inputs) - reference(inputs)
                expected = inputs @ expected_delta(state, block, name, scale).T
                torch.testing.assert_close(change, expected, atol=1e-5, rtol=1e-4)
    assert pipe.lora_id.endswith("@0.5")


def test_lora_changes_the_shot_and_unloads(base, lora_states, tmp_path):
    folder = write_pair(tmp_path / "lora", lora_states)
    pipe = storymem_model.load_pipeline("tiny")

    def shot():
        return pipe.generate_shot_latents("a red boat", seed=1).latents

    before = shot()
    pipe.load_lora(folder)
    with_lora = shot()
    pipe.unload_lora()
    after = shot()
    assert not torch.allclose(before, with_lora)
    assert torch.equal(before, after) and pipe.lora_id is None


def test_high_file_goes_to_high_expert(base, lora_states, tmp_path):
    high, low = lora_states
    folder = write_pair(tmp_path / "lora", (high, low))
    pipe = storymem_model.load_pipeline("tiny", lora=(folder / "backbone_high_noise.pth",
                                                      folder / "backbone_low_noise.pth"), fuse_lora=True)
    delta = pipe.transformer.blocks[0].attn1.to_q.weight - base.transformer.blocks[0].attn1.to_q.weight
    torch.testing.assert_close(delta, expected_delta(high, 0, "self_attn.q", math.sqrt(RANK)), atol=1e-5, rtol=1e-4)


def _drop(state, key_part):
    return {k: v for k, v in state.items() if key_part not in k}


MALFORMED = {
    "missing module": (lambda s: _drop(s, "blocks.1.cross_attn.v."), "missing"),
    "extra module": (lambda s: {**s, "base_model.model.blocks.0.norm3.lora_A.weight": torch.zeros(RANK, 32)},
                     "extra or unknown"),
    "extra block": (lambda s: {**s, "base_model.model.blocks.9.self_attn.q.lora_A.weight": torch.zeros(RANK, 32)},
                    "extra or unknown"),
    "no prefix": (lambda s: {k.replace("base_model.model.", ""): v for k, v in s.items()}, "start with"),
    "wrong rank": (lambda s: {k: (v[: RANK // 2] if "lora_A" in k else v[:, : RANK // 2]) for k, v in s.items()},
                   "rank"),
    "mixed ranks": (lambda s: {k: (v[:4] if "blocks.0.ffn.0.lora_A" in k else
                                   v[:, :4] if "blocks.0.ffn.0.lora_B" in k else v) for k, v in s.items()},
                    "one rank"),
    "wrong shape": (lambda s: {k: (torch.zeros(RANK, 7) if k.endswith("blocks.0.self_attn.k.lora_A.weight")
                                   else v) for k, v in s.items()}, "wrong shapes"),
    "nan": (lambda s: {k: (v * float("nan") if k.endswith("blocks.1.ffn.2.lora_B.weight") else v)
                       for k, v in s.items()}, "NaN"),
}


@pytest.mark.parametrize("variant, which", [(v, "low") for v in sorted(MALFORMED)] + [("missing module", "high")])
def test_malformed_files_are_refused_and_nothing_loads(base, lora_states, tmp_path, variant, which):
    breaker, message = MALFORMED[variant]
    high, low = lora_states
    states = (breaker(high), low) if which == "high" else (high, breaker(low))
    folder = write_pair(tmp_path / "lora", states)
    pipe = storymem_model.load_pipeline("tiny")
    reference = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(LoraLoadError, match=message) as info:
        load_storymem_lora(pipe, folder, rank=RANK)
    assert f"backbone_{which}_noise" in str(info.value)
    for expert in (pipe.transformer, pipe.transformer_2):
        assert not getattr(expert, "peft_config", None)
        assert not any("lora" in name for name, _ in expert.named_parameters())
    assert all(torch.equal(v, reference[k]) for k, v in pipe.transformer.state_dict().items())
    assert pipe.lora_id is None


def test_one_file_only_is_refused(lora_states, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    torch.save(lora_states[0], folder / "backbone_high_noise.pth")
    with pytest.raises(LoraLoadError, match="backbone_low_noise"):
        storymem_model.load_pipeline("tiny", lora=folder)


def test_unreadable_and_ambiguous_files_are_refused(lora_states, tmp_path):
    folder = write_pair(tmp_path / "lora", lora_states)
    (folder / "backbone_low_noise.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LoraLoadError, match="backbone_low_noise.pth: cannot read"):
        storymem_model.load_pipeline("tiny", lora=folder)
    save_file({"x": torch.zeros(1)}, str(folder / "backbone_high_noise.safetensors"))
    with pytest.raises(LoraLoadError, match="keep one"):
        storymem_model.load_pipeline("tiny", lora=folder)
    with pytest.raises(LoraLoadError, match="not found"):
        storymem_model.load_pipeline("tiny", lora=tmp_path / "nowhere")


def test_second_lora_is_refused_until_unloaded(lora_states, tmp_path):
    folder = write_pair(tmp_path / "lora", lora_states)
    pipe = storymem_model.load_pipeline("tiny", lora=folder)
    with pytest.raises(LoraLoadError, match="already holds"):
        pipe.load_lora(folder)
    pipe.unload_lora()
    pipe.load_lora(folder)
