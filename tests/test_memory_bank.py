"""MemoryBank: sink + sliding window over long stories and edge sizes, MR2V references,
the per-resolution latent cache, prompt-aware memory, save/load (local folder and S3)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from storymem_model.memory_bank import KeyframeEntry, MemoryBank, MemoryBankError


def _frames(seed: int, count: int = 9, size=(8, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def _shot_entries(scene, shot, indices, dim=8, size=(8, 12)):
    seed = scene * 100 + shot
    frames = _frames(seed, size=size)
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((len(frames), dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return KeyframeEntry.from_shot(frames, indices, story_id="story", scene=scene, shot=shot,
                                   prompt=f"prompt {scene}/{shot}", embeddings=embeddings,
                                   scores=rng.uniform(2, 6, len(frames)))


def _expected_memory(stored, max_size, sink):
    """Plain statement of the policy: all while it fits, else first `sink` + newest."""
    if len(stored) <= max_size:
        return list(stored)
    window = max_size - sink
    return list(stored[:sink]) + (list(stored[len(stored) - window:]) if window else [])


def test_sink_and_sliding_window_over_a_long_story():
    bank = MemoryBank()  # max_size 10, sink 3
    rng = np.random.default_rng(0)
    added = []
    for shot in range(1, 31):
        count = int(rng.integers(0, 4))
        entries = _shot_entries(1 + shot // 10, shot, sorted(rng.choice(9, count, replace=False)))
        bank.add(entries)
        added += [e.keyframe_id for e in entries]
        memory = [e.keyframe_id for e in bank.entries]
        assert memory == _expected_memory(added, 10, 3)
        assert len(memory) <= 10
        if len(added) > 10:
            assert memory[:3] == added[:3] and memory[3:] == added[-7:]
    assert len(added) > 25
    assert [e.keyframe_id for e in bank.stored] == added


@pytest.mark.parametrize("max_size, sink", [(10, 3), (3, 3), (1, 1), (1, 0), (4, 0), (5, 1)])
def test_edge_sizes(max_size, sink):
    bank = MemoryBank(max_size=max_size, sink=sink)
    added = []
    for shot in range(1, 8):
        entries = _shot_entries(1, shot, [0, 4])
        bank.add(entries)
        added += [e.keyframe_id for e in entries]
        assert [e.keyframe_id for e in bank.entries] == _expected_memory(added, max_size, sink)
    if max_size == sink:  # frozen to the first keyframes of the story
        assert [e.keyframe_id for e in bank.entries] == added[:sink]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_size": 3, "sink": 4}, r"sink \(4\) larger than max_size \(3\)"),
    ({"max_size": 0, "sink": 0}, "max_size must be an integer >= 1"),
    ({"max_size": 5, "sink": -1}, "sink must be an integer >= 0"),
])
def test_impossible_sizes_are_refused(kwargs, message):
    with pytest.raises(MemoryBankError, match=message):
        MemoryBank(**kwargs)


def test_bad_entries_are_refused_and_nothing_is_lost():
    bank = MemoryBank()
    good = _shot_entries(1, 1, [0, 2])
    bank.add(good)
    bad_image = _shot_entries(1, 2, [1])[0]
    bad_image.image = bad_image.image.astype(np.float32)
    with pytest.raises(MemoryBankError, match="uint8"):
        bank.add(_shot_entries(1, 3, [1]) + [bad_image])
    with pytest.raises(MemoryBankError, match="already stored"):
        bank.add(_shot_entries(1, 1, [0]))
    wrong_dim = _shot_entries(1, 4, [0], dim=5)
    with pytest.raises(MemoryBankError, match="embedding dimension 5"):
        bank.add(wrong_dim)
    with pytest.raises(MemoryBankError, match="outside the shot"):
        KeyframeEntry.from_shot(_frames(0), [9], story_id="s", scene=1, shot=1)
    assert [e.keyframe_id for e in bank.stored] == [e.keyframe_id for e in good]


def test_mr2v_references_are_the_initial_memory_and_stay_in_the_sink():
    bank = MemoryBank(max_size=5, sink=3)
    refs = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (10, 20)]
    added = bank.add_references(refs, story_id="story")
    assert [e.kind for e in added] == ["reference", "reference"]
    assert [e.keyframe_id for e in bank.entries] == ["reference000", "reference001"]
    for shot in range(1, 6):
        bank.add(_shot_entries(1, shot, [0, 3]))
    memory = bank.entries
    assert [e.kind for e in memory[:2]] == ["reference", "reference"]
    assert memory[2].keyframe_id == bank.stored[2].keyframe_id  # first keyframe in the sink
    assert [e.keyframe_id for e in memory[3:]] == [e.keyframe_id for e in bank.stored[-2:]]
    # duplicates are checked against stored keyframes, not against the references
    assert bank.stored_embeddings().shape == (10, 8)
    with pytest.raises(MemoryBankError, match="must enter before any keyframe"):
        bank.add_references(refs[:1], story_id="story")


class CountingEncoder:
    """A deterministic stand-in for pipeline.encode_keyframes (a VAE is issue 2's):
    latent = per-channel means of the image, tiled; records every call."""

    def __init__(self, dtype=torch.float32):
        self.calls = []
        self.dtype = dtype

    def __call__(self, images, height, width):
        self.calls.append((len(images), height, width))
        means = torch.as_tensor(images, dtype=torch.float32).mean(dim=(1, 2))  # (K, 3)
        latent = torch.zeros(len(images), 16, 1, height // 8, width // 8)
        latent[:, :3] = means[:, :, None, None, None]
        latent[:, 3] = height + width
        return latent.to(self.dtype)


def test_latents_are_encoded_once_per_keyframe_per_resolution():
    bank = MemoryBank(max_size=4, sink=1)
    encode = CountingEncoder()
    bank.add(_shot_entries(1, 1, [0, 1, 2]))
    first = bank.latents(encode, 64, 64)
    assert first.shape == (3, 16, 1, 8, 8)
    assert encode.calls == [(3, 64, 64)]
    assert torch.equal(bank.latents(encode, 64, 64), first)
    assert encode.calls == [(3, 64, 64)]
    bank.add(_shot_entries(1, 2, [0, 5]))  # memory: 1 sink + 3 newest
    second = bank.latents(encode, 64, 64)
    assert encode.calls[1:] == [(2, 64, 64)]
    expected = encode(np.stack(bank.images()), 64, 64)
    assert torch.equal(second, expected)
    encode.calls.clear()
    bank.latents(encode, 32, 48)  # a new resolution encodes the memory again, once
    bank.latents(encode, 32, 48)
    assert encode.calls == [(4, 32, 48)]
    # an explicit selection outside the memory (prompt-aware) is cached the same way
    encode.calls.clear()
    out = bank.latents(encode, 32, 48, entries=bank.stored)
    assert out.shape[0] == 5 and encode.calls == [(1, 32, 48)]


def test_latents_group_images_of_different_sizes():
    bank = MemoryBank()
    bank.add_references([np.zeros((16, 24, 3), np.uint8)], story_id="s")
    bank.add(_shot_entries(1, 1, [0, 1]))
    encode = CountingEncoder()
    assert bank.latents(encode, 16, 16).shape == (3, 16, 1, 2, 2)
    assert sorted(encode.calls) == [(1, 16, 16), (2, 16, 16)]


def test_bad_encoder_output_is_named():
    bank = MemoryBank()
    bank.add(_shot_entries(1, 1, [0, 1]))
    with pytest.raises(MemoryBankError, match="encode_fn returned"):
        bank.latents(lambda images, h, w: torch.zeros(1, 16, 1, 2, 2), 16, 16)
    with pytest.raises(MemoryBankError, match="no memory entries"):
        MemoryBank().latents(CountingEncoder(), 16, 16)


def test_prompt_aware_memory_keeps_the_sink_and_picks_the_closest():
    bank = MemoryBank(max_size=4, sink=2)
    for shot in range(1, 5):
        bank.add(_shot_entries(1, shot, [0, 4]))
    stored = bank.stored
    text = stored[3].clip_embedding + stored[5].clip_embedding  # close to entries 3 and 5
    chosen = bank.select_for_prompt(text)
    vectors = np.stack([e.clip_embedding for e in stored[2:]])
    best = np.argsort(-(vectors @ text))[:2] + 2
    assert [e.keyframe_id for e in chosen] == (
        [stored[0].keyframe_id, stored[1].keyframe_id]
        + [stored[i].keyframe_id for i in sorted(best)])
    assert {3, 5} == set(int(i) for i in best)
    # off by default: the policy's memory
    assert bank.memory_for_shot("any prompt") == bank.entries
    with pytest.raises(MemoryBankError, match="needs the next shot's prompt"):
        bank.memory_for_shot(None, None, prompt_aware=True)
    small = MemoryBank(max_size=10, sink=3)
    small.add(_shot_entries(1, 1, [0, 4]))
    assert small.select_for_prompt(text) == small.stored


def test_prompt_aware_memory_with_the_tiny_clip():
    from storymem_model.scorers import build_scorers

    embedder = build_scorers("tiny").embedder
    bank = MemoryBank(max_size=3, sink=1)
    for shot in range(1, 5):
        frames = _frames(shot, count=3, size=(64, 64))
        bank.add(KeyframeEntry.from_shot(frames, [0, 2], story_id="s", scene=1, shot=shot,
                                         embeddings=embedder.embed_images(frames)))
    prompt = "a lighthouse in a storm"
    chosen = bank.memory_for_shot(prompt, embedder, prompt_aware=True)
    text = embedder.embed_texts([prompt])[0]
    similarity = np.stack([e.clip_embedding for e in bank.stored[1:]]) @ text
    top = sorted(np.argsort(-similarity)[:2] + 1)
    assert [e.keyframe_id for e in chosen] == [bank.stored[0].keyframe_id] + [
        bank.stored[i].keyframe_id for i in top]


def _full_bank() -> MemoryBank:
    bank = MemoryBank(max_size=4, sink=2)
    bank.add_references([np.arange(10 * 14 * 3, dtype=np.uint8).reshape(10, 14, 3)],
                        story_id="story")
    bank.stored[0].clip_embedding = np.full(8, 8 ** -0.5, dtype=np.float32)
    for shot in range(1, 4):
        bank.add(_shot_entries(2, shot, [1, 7]))
    bank.latents(CountingEncoder(), 64, 64)
    bank.latents(CountingEncoder(torch.bfloat16), 32, 32)
    bank.stored[-1].aesthetic_score = None
    return bank


def _assert_same(a: MemoryBank, b: MemoryBank):
    assert (a.max_size, a.sink) == (b.max_size, b.sink)
    assert [e.keyframe_id for e in a.entries] == [e.keyframe_id for e in b.entries]
    assert len(a.stored) == len(b.stored)
    for x, y in zip(a.stored, b.stored):
        for name in ("keyframe_id", "story_id", "scene", "shot", "frame_index", "prompt",
                     "aesthetic_score", "kind"):
            assert getattr(x, name) == getattr(y, name), name
        assert x.image.dtype == y.image.dtype and np.array_equal(x.image, y.image)
        if x.clip_embedding is None:
            assert y.clip_embedding is None
        else:
            assert y.clip_embedding.dtype == np.float32
            assert np.array_equal(x.clip_embedding, y.clip_embedding)
        assert sorted(x.latents) == sorted(y.latents)
        for key in x.latents:
            assert x.latents[key].dtype == y.latents[key].dtype
            assert torch.equal(x.latents[key], y.latents[key])


def test_round_trip_through_a_local_folder(tmp_path):
    bank = _full_bank()
    uri = str(tmp_path / "bank")
    bank.save(uri)
    loaded = MemoryBank.load(uri)
    _assert_same(bank, loaded)
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert manifest["memory"] == [e.keyframe_id for e in bank.entries]
    assert sorted(os.listdir(tmp_path / "bank" / "latents")) == [
        "32x32.safetensors", "64x64.safetensors"]
    # the loaded bank goes on: more keyframes, saved again; old images are not rewritten
    png = tmp_path / "bank" / "images" / f"{bank.stored[1].keyframe_id}.png"
    before = png.stat().st_mtime_ns
    loaded.add(_shot_entries(3, 1, [2]))
    loaded.latents(CountingEncoder(), 64, 64)
    loaded.save(uri)
    assert png.stat().st_mtime_ns == before
    _assert_same(loaded, MemoryBank.load(uri))


@pytest.mark.s3
def test_round_trip_through_s3(s3_bucket):
    bank = _full_bank()
    uri = f"{s3_bucket}/stories/story/memory"
    bank.save(uri)
    _assert_same(bank, MemoryBank.load(uri))


def test_broken_banks_are_named(tmp_path):
    with pytest.raises(MemoryBankError, match="no memory bank at"):
        MemoryBank.load(str(tmp_path / "missing"))
    bank = _full_bank()
    uri = str(tmp_path / "bank")
    bank.save(uri)
    png = tmp_path / "bank" / "images" / f"{bank.stored[2].keyframe_id}.png"
    png.write_bytes(b"not a png")
    with pytest.raises(MemoryBankError, match=f"{png.name}: not a readable PNG"):
        MemoryBank.load(uri)
    bank2 = _full_bank()
    uri2 = str(tmp_path / "bank2")
    bank2.save(uri2)
    manifest_path = tmp_path / "bank2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["memory"] = manifest["memory"][::-1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(MemoryBankError, match="does not follow"):
        MemoryBank.load(uri2)
    (tmp_path / "bank2" / "latents" / "64x64.safetensors").unlink()
    with pytest.raises(MemoryBankError, match="latents/64x64.safetensors is missing"):
        MemoryBank.load(uri2)
