"""Model, LoRA and scorer ids come from content: a moved folder keeps its hash, a byte changes it."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

import storymem_model
from model_folders import save_diffusers_folders, write_lora_pair
from storymem_model import model_identity as mi
from storymem_model.presets import TINY
from storymem_model.render_spec import resolve_render_spec
from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return storymem_model.load_pipeline("tiny")


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    i2v, t2v = save_diffusers_folders(tiny, root)
    lora = write_lora_pair(root / "lora", (tiny.transformer, tiny.transformer_2), TINY.lora_rank)
    return i2v, t2v, lora


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(mi.CACHE_ENV, str(tmp_path / "cache"))


def _hash(model: ModelSpec) -> str:
    return resolve_render_spec(model, None, RenderSettings(memory=False),
                               accelerator=False).config_hash


def test_moving_the_model_and_lora_folders_keeps_the_hash(folders, tmp_path):
    i2v, t2v, lora = folders
    spec = ModelSpec(model_dir=str(i2v), t2v_model_dir=str(t2v), lora_dir=str(lora))
    moved = tmp_path / "mounted" / "elsewhere"
    for folder in (i2v, t2v, lora):
        shutil.copytree(folder, moved / folder.name)
    spec_moved = ModelSpec(model_dir=str(moved / i2v.name), t2v_model_dir=str(moved / t2v.name),
                           lora_dir=str(moved / lora.name))
    assert mi.model_identity(spec) == mi.model_identity(spec_moved)
    assert _hash(spec) == _hash(spec_moved)
    # ids name no path
    identity = mi.model_identity(spec)
    assert str(i2v) not in json.dumps(identity.__dict__)
    assert identity.model_id.startswith("wan2.2-i2v-a14b:")
    assert identity.t2v_model_id.startswith("wan2.2-t2v-a14b:")
    assert identity.lora_id.startswith("storymem-lora:")


def test_one_changed_lora_byte_changes_the_hash(folders, tmp_path):
    i2v, _, lora = folders
    copy = tmp_path / "lora"
    shutil.copytree(lora, copy)
    before = _hash(ModelSpec(model_dir=str(i2v), lora_dir=str(copy)))
    target = copy / "backbone_low_noise.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    target.write_bytes(bytes(data))
    after = _hash(ModelSpec(model_dir=str(i2v), lora_dir=str(copy)))
    assert before != after
    assert _hash(ModelSpec(model_dir=str(i2v), lora_dir=str(copy), lora_strength=0.5)) != after
    assert _hash(ModelSpec(model_dir=str(i2v))) not in (before, after)


def test_model_config_and_weight_layout_changes_change_the_id(folders, tmp_path):
    i2v, _, _ = folders
    base = mi.model_identity(ModelSpec(model_dir=str(i2v))).model_id
    edited = tmp_path / "edited"
    shutil.copytree(i2v, edited)
    config = edited / "transformer" / "config.json"
    data = json.loads(config.read_text())
    data["eps"] = 1e-5
    config.write_text(json.dumps(data))
    assert mi.model_identity(ModelSpec(model_dir=str(edited))).model_id != base
    # a safetensors header (a tensor's name, dtype, shape or offsets) is part of the id
    renamed = tmp_path / "renamed"
    shutil.copytree(i2v, renamed)
    weights = next((renamed / "vae").glob("*.safetensors"))
    blob = weights.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = blob[8:8 + length].replace(b'"dtype":"F32"', b'"dtype":"F32" ', 1)
    weights.write_bytes(struct.pack("<Q", len(header)) + header + blob[8 + length:])
    assert mi.model_identity(ModelSpec(model_dir=str(renamed))).model_id != base
    # a README next to the weights is not
    readme = tmp_path / "readme"
    shutil.copytree(i2v, readme)
    (readme / "README.md").write_text("notes")
    assert mi.model_identity(ModelSpec(model_dir=str(readme))).model_id == base


def test_unreadable_paths_are_named(tmp_path):
    with pytest.raises(mi.IdentityError, match="model folder not found"):
        mi.model_identity(ModelSpec(model_dir=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(mi.IdentityError, match="not a Wan2.2 A14B layout"):
        mi.model_identity(ModelSpec(model_dir=str(tmp_path / "empty")))
    lora = tmp_path / "half"
    lora.mkdir()
    (lora / "backbone_high_noise.pth").write_bytes(b"x")
    with pytest.raises(mi.IdentityError, match="backbone_low_noise.* is missing"):
        mi.lora_files(lora)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * (mi.SMALL_FILE_BYTES + 16))
    with pytest.raises(mi.IdentityError, match="not a safetensors file"):
        mi.file_digest(bad)


def test_full_file_digests_are_cached_by_path_size_and_mtime(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * (mi.SMALL_FILE_BYTES + 1))
    first = mi.file_digest(weights)
    cache = json.loads((tmp_path / "cache" / "file-digests.json").read_text())
    assert cache[str(weights.resolve())]["sha256"] == first
    weights.write_bytes(b"b" * (mi.SMALL_FILE_BYTES + 1))  # new content, new mtime
    assert mi.file_digest(weights) != first


def test_scorer_ids_come_from_checkpoint_content(tmp_path):
    from storymem_model.scorers.clip_embedder import TINY_CLIP_NAME, OpenClipEmbedder

    clip = OpenClipEmbedder.tiny()
    torch.save(clip.model.state_dict(), tmp_path / "clip.pt")
    torch.save({"weight": torch.ones(1, 64), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    spec = ScorerSpec(clip_checkpoint=str(tmp_path / "clip.pt"), clip_model=TINY_CLIP_NAME,
                      aesthetic_head=str(tmp_path / "head.pth"),
                      aesthetic_clip_checkpoint=str(tmp_path / "clip.pt"),
                      aesthetic_clip_model=TINY_CLIP_NAME)
    identity = mi.scorer_identity(spec)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("clip.pt", "head.pth"):
        shutil.copy(tmp_path / name, moved / name)
    moved_spec = spec.replace(clip_checkpoint=str(moved / "clip.pt"),
                              aesthetic_head=str(moved / "head.pth"),
                              aesthetic_clip_checkpoint=str(moved / "clip.pt"))
    assert mi.scorer_identity(moved_spec) == identity
    assert identity.gate_threshold == mi.AESTHETIC_GATE_THRESHOLD
    torch.save({"weight": torch.full((1, 64), 2.0), "bias": torch.zeros(1)}, moved / "head.pth")
    assert mi.scorer_identity(moved_spec).gate_id != identity.gate_id
    # the built scorers carry the same ids (they go into the config hash)
    from storymem_model.scorers.factory import build_keyframe_scorers

    built = build_keyframe_scorers(spec)
    assert (built.embedder.name, built.gate.name) == (identity.embedder_id, identity.gate_id)


def test_large_safetensors_are_fingerprinted_by_header_and_size(tmp_path):
    """Base weights (GBs) are identified by every tensor's name, dtype, shape and offsets
    plus the file size - read in microseconds; LoRA files are hashed whole (above)."""
    from safetensors.torch import save_file

    path = tmp_path / "expert.safetensors"
    save_file({"w": torch.zeros(600, 600)}, str(path))  # 1.4 MB: over the small-file size
    assert path.stat().st_size > mi.SMALL_FILE_BYTES
    first = mi.file_digest(path)
    save_file({"w": torch.ones(600, 600)}, str(path))
    assert mi.file_digest(path) == first  # same layout: a documented limit (docs/outputs.md)
    save_file({"w2": torch.zeros(600, 600)}, str(path))
    assert mi.file_digest(path) != first
    save_file({"w": torch.zeros(600, 601)}, str(path))
    assert mi.file_digest(path) != first
