"""Loading real-layout folders: the tiny model saved as Wan2.2 diffusers and original layouts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import storymem_model
from model_folders import save_diffusers_folders
from storymem_model.model_identity import model_identity
from storymem_model.model_loading import ModelLoadError
from storymem_model.specs import ModelSpec
from storymem_model.presets import TINY

SHOT = dict(height=TINY.shot.height, width=TINY.shot.width, num_frames=TINY.shot.num_frames,
            num_inference_steps=TINY.shot.num_inference_steps, seed=3)

# diffusers name fragment -> original Wan name fragment, written from docs/method.md#lora-format-and-scale, #checkpoint-name-mapping (inverse direction).
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # the affine cross-attention norm
]


def to_original_name(name: str) -> str:
    if name.startswith("scale_shift_table"):
        return "head.modulation"
    if name.startswith("proj_out."):
        return name.replace("proj_out.", "head.head.")
    for new, old in TO_ORIGINAL:
        name = name.replace(new, old)
    return name.replace(".scale_shift_table", ".modulation")


def save_original_expert(transformer, folder):
    folder.mkdir(parents=True)
    cfg = transformer.config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": cfg.num_attention_heads * cfg.attention_head_dim, "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "model_type": "i2v",
        "num_heads": cfg.num_attention_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_channels,
        "text_len": 512, "text_dim": cfg.text_dim}))
    state = {to_original_name(k): v.contiguous().clone() for k, v in transformer.state_dict().items()}
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return storymem_model.load_pipeline("tiny")


@pytest.fixture(scope="module")
def diffusers_folder(tiny, tmp_path_factory):
    return save_diffusers_folders(tiny, tmp_path_factory.mktemp("models"))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_diffusers_layout_loads_and_reproduces_the_shot(tiny, diffusers_folder):
    root, t2v = diffusers_folder
    pipe = storymem_model.load_pipeline(root, t2v=t2v, device="cpu", text_length=TINY.text_length)
    assert (pipe.default_height, pipe.default_width, pipe.default_num_frames, pipe.fps) == (480, 832, 81, 16)
    assert pipe.default_sampling["num_inference_steps"] == 40
    # ids come from the folders' content, not their paths (tests/test_model_identity.py)
    identity = model_identity(ModelSpec(model_dir=str(root), t2v_model_dir=str(t2v)))
    assert pipe.model_id == identity.model_id and pipe.model_id.startswith("wan2.2-i2v-a14b:")
    assert pipe.t2v_model_id == identity.t2v_model_id
    assert pipe.t2v_model_id.startswith("wan2.2-t2v-a14b:")
    for name in ("transformer", "transformer_2", "t2v_transformer", "t2v_transformer_2", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), getattr(tiny, name))
    memory = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(pipe.generate_shot("a boat", memory=memory, **SHOT),
                          tiny.generate_shot("a boat", memory=memory, **SHOT))
    assert torch.equal(pipe.generate_shot_latents("a boat", use_t2v=True, **SHOT).latents,
                       tiny.generate_shot_latents("a boat", use_t2v=True, **SHOT).latents)


def test_original_layout_loads_the_same_experts(tiny, diffusers_folder, tmp_path):
    root, _ = diffusers_folder
    original = tmp_path / "Wan2.2-I2V-A14B"
    save_original_expert(tiny.transformer, original / "high_noise_model")
    save_original_expert(tiny.transformer_2, original / "low_noise_model")
    pipe = storymem_model.load_pipeline(original, components=root, device="cpu", text_length=TINY.text_length)
    assert_same_weights(pipe.transformer, tiny.transformer)
    assert_same_weights(pipe.transformer_2, tiny.transformer_2)
    assert torch.equal(pipe.generate_shot_latents("a boat", **SHOT).latents,
                       tiny.generate_shot_latents("a boat", **SHOT).latents)


def test_original_layout_needs_components(tiny, tmp_path):
    save_original_expert(tiny.transformer, tmp_path / "high_noise_model")
    save_original_expert(tiny.transformer_2, tmp_path / "low_noise_model")
    with pytest.raises(ModelLoadError, match="components="):
        storymem_model.load_pipeline(tmp_path, device="cpu")


def test_broken_original_checkpoint_is_refused(tiny, diffusers_folder, tmp_path):
    root, _ = diffusers_folder
    save_original_expert(tiny.transformer, tmp_path / "high_noise_model")
    save_original_expert(tiny.transformer_2, tmp_path / "low_noise_model")
    shard = tmp_path / "low_noise_model" / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        storymem_model.load_pipeline(tmp_path, components=root, device="cpu")
    (tmp_path / "low_noise_model" / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        storymem_model.load_pipeline(tmp_path, components=root, device="cpu")


def test_folder_errors_name_the_problem(diffusers_folder, tmp_path):
    root, t2v = diffusers_folder
    with pytest.raises(ModelLoadError, match="not a folder"):
        storymem_model.load_pipeline(tmp_path / "absent", device="cpu")
    with pytest.raises(ModelLoadError, match="not a Wan2.2 A14B layout"):
        storymem_model.load_pipeline(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="takes 16 input channels"):
        storymem_model.load_pipeline(t2v, components=root, device="cpu")  # T2V given as the M2V model
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer"):
        (broken / name).symlink_to(root / name)
    (broken / "vae_missing").mkdir()
    (broken / "vae").unlink()
    with pytest.raises(ModelLoadError, match="missing vae/"):
        storymem_model.load_pipeline(broken, device="cpu")


def test_training_reads_one_expert_and_the_encoders_from_the_same_folders(tiny, diffusers_folder, tmp_path):
    """Training loads one expert (`training.experts.load_expert`) and only the encoders
    (`training.encoding.build_encoding_pipeline`) through the loaders inference uses."""
    from storymem_model.training.encoding import build_encoding_pipeline
    from storymem_model.training.experts import load_expert

    root, t2v = diffusers_folder
    original = tmp_path / "Wan2.2-I2V-A14B"
    save_original_expert(tiny.transformer, original / "high_noise_model")
    save_original_expert(tiny.transformer_2, original / "low_noise_model")
    for folder in (root, original):
        spec = ModelSpec(model_dir=str(folder))
        assert_same_weights(load_expert(spec, "high", torch.float32), tiny.transformer)
        assert_same_weights(load_expert(spec, "low", torch.float32), tiny.transformer_2)
    with pytest.raises(ModelLoadError, match="takes 16 input channels"):
        load_expert(ModelSpec(model_dir=str(t2v)), "low", torch.float32)
    with pytest.raises(ValueError, match="expert must be 'high' or 'low'"):
        load_expert(ModelSpec(model_dir=str(root)), "middle", torch.float32)
    for spec in (ModelSpec(model_dir=str(root), device="cpu", dtype="float32"),
                 ModelSpec(model_dir=str(original), components_dir=str(root), device="cpu", dtype="float32")):
        encoder = build_encoding_pipeline(spec)
        for name in ("vae", "text_encoder"):
            assert_same_weights(getattr(encoder, name), getattr(tiny, name))
    with pytest.raises(ModelLoadError, match="components="):
        build_encoding_pipeline(ModelSpec(model_dir=str(original), device="cpu", dtype="float32"))


def test_device_dtype_and_offload_arguments_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        storymem_model.load_pipeline("tiny", dtype="int8")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        storymem_model.load_pipeline("tiny", device="cpu", offload="model")
    with pytest.raises(ValueError, match="offload must be"):
        storymem_model.load_pipeline("tiny", offload="disk")
    pipe = storymem_model.load_pipeline("tiny", dtype="bf16")
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert pipe.transformer.blocks[0].norm2.weight.dtype == torch.float32  # kept in fp32 like diffusers does
    video = pipe.generate_shot("a boat", seed=1)
    assert video.shape == (TINY.shot.num_frames, TINY.shot.height, TINY.shot.width, 3)
