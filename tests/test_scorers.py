"""Scorers: the tiny CLIP and aesthetic head, real-checkpoint loading from local files,
build_scorers, input checks, and the light import the HPS environment relies on."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from storymem_model.scorers import (AESTHETIC_GATE_THRESHOLD, TINY_GATE_THRESHOLD, ImageEmbedder,
                                    ImageScorer, KeyframeScorers, ScorerError, ScorerSpec,
                                    build_scorers)


@pytest.fixture(scope="module")
def clip():
    from storymem_model.scorers.clip_embedder import OpenClipEmbedder
    torch.set_num_threads(1)
    return OpenClipEmbedder.tiny()


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)


def test_light_import_for_the_hps_environment():
    code = ("import sys, storymem_model.scorers, storymem_model.scorers.base; "
            "heavy = [m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tiny_clip_embeddings(clip, frames):
    from storymem_model.scorers.clip_embedder import OpenClipEmbedder

    assert isinstance(clip, ImageEmbedder)
    assert sum(p.numel() for p in clip.model.parameters()) < 5_000_000
    images = clip.embed_images(frames)
    assert images.shape == (17, 64) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    texts = clip.embed_texts(["a keeper climbs the stairs", "a boat in a storm"])
    assert texts.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert texts[0] @ texts[1] < 0.99
    # seeded: the same seed gives the same model, another seed another one
    again = OpenClipEmbedder.tiny()
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 clip.model.state_dict().values()))
    np.testing.assert_allclose(again.embed_images(frames[:3]), images[:3], atol=1e-6)
    assert not np.allclose(OpenClipEmbedder.tiny(seed=5).embed_images(frames[:3]), images[:3],
                           atol=1e-3)
    # batches give what single images give
    single = np.concatenate([clip.embed_images(frames[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(single, images[:5], atol=1e-5)


def test_tiny_clip_separates_different_frames_from_near_duplicates(clip, frames):
    """Reference threshold 0.9 must mean something on tiny frames."""
    rng = np.random.default_rng(1)
    copies = np.clip(frames[:1].astype(int) + rng.integers(-10, 11, (4, 64, 64, 3)), 0, 255)
    near = clip.embed_images(copies.astype(np.uint8)) @ clip.embed_images(frames[:1])[0]
    different = clip.embed_images(frames)
    similarity = different @ different.T
    assert near.min() > 0.9
    assert np.median(similarity[np.triu_indices(17, 1)]) < 0.9


def test_preprocessing_squash_sees_the_whole_frame_and_center_crop_the_centre(clip):
    from storymem_model.scorers.clip_embedder import OpenClipEmbedder

    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    edited = wide.copy()
    edited[:, :16] = 255 - edited[:, :16]  # change only the left edge
    cropper = OpenClipEmbedder.tiny(resize_mode="center_crop")
    # center_crop: only the centre 64x64 counts (open_clip's transform)
    np.testing.assert_allclose(cropper.embed_images(wide[None]),
                               cropper.embed_images(wide[None, :, 32:96]), atol=1e-6)
    np.testing.assert_allclose(cropper.embed_images(edited[None]),
                               cropper.embed_images(wide[None]), atol=1e-6)
    # squash (default, as the reference): the whole frame, so the edited edge counts
    assert clip.resize_mode == "squash"
    assert np.abs(clip.embed_images(edited[None]) - clip.embed_images(wide[None])).max() > 1e-3
    assert clip.embed_images(rng.integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)).shape \
        == (2, 64)
    with pytest.raises(ScorerError, match="resize_mode must be one of"):
        OpenClipEmbedder.tiny(resize_mode="stretch")


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "dtype uint8"),
    (np.zeros((2, 8, 8), np.uint8), r"shape \(N, H, W, 3\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty batch"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "different sizes"),
])
def test_bad_images_are_named(clip, images, message):
    with pytest.raises(ScorerError, match=message):
        clip.embed_images(images)


def test_bad_texts_and_prompts_are_named(clip, frames):
    with pytest.raises(ScorerError, match="single string"):
        clip.embed_texts("one string")
    with pytest.raises(ScorerError, match="empty list"):
        clip.embed_texts([])
    gate = build_scorers("tiny").gate
    with pytest.raises(ScorerError, match="2 prompts for 17 images"):
        gate.score_images(frames, ["a", "b"])


def test_clip_loads_a_local_checkpoint_file(clip, frames, tmp_path):
    from storymem_model.scorers.clip_embedder import TINY_CLIP_NAME, OpenClipEmbedder

    path = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = OpenClipEmbedder(TINY_CLIP_NAME, str(path))
    assert loaded.name.endswith(":clip.pt")
    np.testing.assert_array_equal(loaded.embed_images(frames), clip.embed_images(frames))
    np.testing.assert_array_equal(loaded.embed_texts(["x"]), clip.embed_texts(["x"]))
    with pytest.raises(ScorerError, match="checkpoint file not found"):
        OpenClipEmbedder(TINY_CLIP_NAME, str(tmp_path / "missing.pt"))
    with pytest.raises(ScorerError, match="no checkpoint path"):
        OpenClipEmbedder("ViT-B-32-quickgelu")
    with pytest.raises(ScorerError, match="unknown open_clip model"):
        OpenClipEmbedder("no-such-model", str(path))


def _torchscript_archive(state: dict, path) -> None:
    """A TorchScript file holding `state` under the same names, as OpenAI ships CLIP."""
    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, torch.nn.Module())
            node = node._modules[part]
        node.register_buffer(leaf, value.detach().clone().half())  # OpenAI ships fp16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still shipped
        torch.jit.save(torch.jit.script(root), str(path))


def test_clip_loads_openai_torchscript_files_and_names_bad_ones(clip, frames, tmp_path):
    from storymem_model.scorers.clip_embedder import TINY_CLIP_NAME, OpenClipEmbedder

    state = dict(clip.model.state_dict())
    state["input_resolution"] = torch.tensor(64)
    _torchscript_archive(state, tmp_path / "openai.pt")
    loaded = OpenClipEmbedder(TINY_CLIP_NAME, str(tmp_path / "openai.pt"))
    assert next(loaded.model.parameters()).dtype == torch.float32
    half = OpenClipEmbedder.tiny()
    with torch.no_grad():
        for param in half.model.parameters():
            param.copy_(param.half().float())
    np.testing.assert_allclose(loaded.embed_images(frames), half.embed_images(frames),
                               atol=1e-5)
    del state["visual.proj"]
    _torchscript_archive(state, tmp_path / "broken.pt")
    with pytest.raises(ScorerError, match=r"(?s)cannot load CLIP .*visual.proj"):
        OpenClipEmbedder(TINY_CLIP_NAME, str(tmp_path / "broken.pt"))
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(ScorerError, match="cannot load CLIP"):
        OpenClipEmbedder(TINY_CLIP_NAME, str(tmp_path / "junk.bin"))


def _save_head(path, tensors):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def test_aesthetic_head_formats(clip, frames, tmp_path):
    from storymem_model.scorers.aesthetic_scorer import AestheticScorer, load_aesthetic_head

    embeddings = torch.from_numpy(clip.embed_images(frames))
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(1, 64, generator=gen), torch.tensor([5.0])
    _save_head(tmp_path / "linear.pth", {"weight": weight, "bias": bias})
    scorer = AestheticScorer(clip, load_aesthetic_head(str(tmp_path / "linear.pth")))
    assert isinstance(scorer, ImageScorer)
    scores = scorer.score_images(frames)
    assert scores.shape == (17,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, (embeddings @ weight.T + bias)[:, 0].numpy(), rtol=1e-5)
    # the "improved aesthetic predictor" layout: linear layers (dropout between, no activation)
    layers = {"layers.0.weight": torch.randn(32, 64, generator=gen),
              "layers.0.bias": torch.randn(32, generator=gen),
              "layers.2.weight": torch.randn(8, 32, generator=gen),
              "layers.2.bias": torch.randn(8, generator=gen),
              "layers.4.weight": torch.randn(1, 8, generator=gen),
              "layers.4.bias": torch.randn(1, generator=gen)}
    _save_head(tmp_path / "mlp.safetensors", layers)
    mlp = AestheticScorer(clip, load_aesthetic_head(str(tmp_path / "mlp.safetensors")))
    expected = embeddings
    for i in (0, 2, 4):
        expected = expected @ layers[f"layers.{i}.weight"].T + layers[f"layers.{i}.bias"]
    np.testing.assert_allclose(mlp.score_images(frames), expected[:, 0].numpy(), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("tensors, message", [
    ({"weight": torch.zeros(2, 64), "bias": torch.zeros(2)}, "gives 2 outputs"),
    ({"fc.weight": torch.zeros(1, 64)}, "unexpected key 'fc.weight'"),
    ({"layers.0.weight": torch.zeros(1, 64)}, "layer 0 lacks weight or bias"),
    ({"weight": torch.zeros(1, 64), "bias": torch.zeros(3)}, "has weight"),
])
def test_bad_aesthetic_heads_are_named(tmp_path, tensors, message):
    from storymem_model.scorers.aesthetic_scorer import load_aesthetic_head

    _save_head(tmp_path / "head.pth", tensors)
    with pytest.raises(ScorerError, match=message):
        load_aesthetic_head(str(tmp_path / "head.pth"))


def test_aesthetic_head_must_match_the_clip(clip, tmp_path):
    from storymem_model.scorers.aesthetic_scorer import AestheticScorer, load_aesthetic_head

    with pytest.raises(ScorerError, match="not found"):
        load_aesthetic_head(str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ScorerError, match="cannot read aesthetic head"):
        load_aesthetic_head(str(tmp_path / "junk.pth"))
    _save_head(tmp_path / "l14.pth", {"weight": torch.zeros(1, 768), "bias": torch.zeros(1)})
    with pytest.raises(ScorerError, match="takes 768-dim embeddings"):
        AestheticScorer(clip, load_aesthetic_head(str(tmp_path / "l14.pth")))


def test_build_scorers_tiny(frames):
    scorers = build_scorers("tiny")
    assert isinstance(scorers, KeyframeScorers)
    assert isinstance(scorers.embedder, ImageEmbedder) and isinstance(scorers.gate, ImageScorer)
    assert scorers.gate_threshold == TINY_GATE_THRESHOLD
    scores = scorers.gate.score_images(frames)
    # the documented tiny threshold sits inside the tiny score distribution
    assert scores.min() < TINY_GATE_THRESHOLD < scores.max()


def test_build_scorers_from_local_checkpoints(clip, frames, tmp_path):
    from storymem_model.scorers.clip_embedder import TINY_CLIP_NAME

    torch.save(clip.model.state_dict(), tmp_path / "clip.pt")
    _save_head(tmp_path / "head.pth", {"weight": torch.ones(1, 64), "bias": torch.zeros(1)})
    paths = ScorerSpec(clip_checkpoint=str(tmp_path / "clip.pt"), clip_model=TINY_CLIP_NAME,
                        aesthetic_head=str(tmp_path / "head.pth"),
                        aesthetic_clip_checkpoint=str(tmp_path / "clip.pt"),
                        aesthetic_clip_model=TINY_CLIP_NAME)
    scorers = build_scorers(paths)
    assert scorers.gate_threshold == AESTHETIC_GATE_THRESHOLD
    expected = clip.embed_images(frames).sum(axis=1)
    np.testing.assert_allclose(scorers.gate.score_images(frames), expected, rtol=1e-4, atol=1e-5)
    as_dict = build_scorers({"clip_checkpoint": paths.clip_checkpoint,
                             "clip_model": TINY_CLIP_NAME}, gate=scorers.gate,
                            gate_threshold=1.5)
    assert as_dict.gate_threshold == 1.5


class _HPSLikeGate:
    name = "hps-like"
    default_threshold = 3.0

    def score_images(self, images, prompts=None):
        return np.full(len(images), 3.5, np.float32)


def test_build_scorers_with_another_gate_and_bad_arguments(tmp_path):
    assert build_scorers("tiny", gate=_HPSLikeGate()).gate_threshold == 3.0
    gate = _HPSLikeGate()
    gate.default_threshold = None
    with pytest.raises(ScorerError, match="pass gate_threshold"):
        build_scorers("tiny", gate=gate)
    with pytest.raises(ScorerError, match="does not follow the ImageScorer protocol"):
        build_scorers("tiny", gate=object(), gate_threshold=1.0)
    with pytest.raises(ScorerError, match="preset must be one of tiny, got 'large'"):
        build_scorers("large")
    with pytest.raises(ScorerError, match=r"unknown field\(s\) \['hps'\]"):
        build_scorers({"clip_checkpoint": "x", "hps": "y"})
    with pytest.raises(ScorerError, match="need clip_checkpoint"):
        build_scorers({})
    with pytest.raises(ScorerError, match="no quality gate"):
        build_scorers({"clip_checkpoint": "x"})
    with pytest.raises(ScorerError, match="checkpoint file not found"):
        build_scorers(ScorerSpec(clip_checkpoint=str(tmp_path / "none.pt"),
                                 aesthetic_head="h.pth", aesthetic_clip_checkpoint="c.pt"))
