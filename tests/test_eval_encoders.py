"""Video-text encoders: ViCLIP built from its released checkpoint layout, tiny variants,
frame sampling, the CLIP frame average."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from storymem_model.evaluation import video_encoders as ve
from storymem_model.evaluation.encoder_factory import build_video_encoder

torch.set_num_threads(1)

# Shapes of the released ViClip-InternVid-10M-FLT.pth ("model" entry), ViT-L/14 + CLIP text.
RELEASED_SHAPES = {
    "temp": (),
    "vision_encoder.class_embedding": (1024,),
    "vision_encoder.positional_embedding": (257, 1024),
    "vision_encoder.temporal_positional_embedding": (1, 8, 1024),
    "vision_encoder.conv1.weight": (1024, 3, 1, 14, 14),
    "vision_encoder.ln_pre.weight": (1024,),
    "vision_encoder.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
    "vision_encoder.transformer.resblocks.23.attn.out_proj.weight": (1024, 1024),
    "vision_encoder.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
    "vision_encoder.transformer.resblocks.23.mlp.c_proj.bias": (1024,),
    "vision_encoder.ln_post.bias": (1024,),
    "vision_encoder.proj": (1024, 768),
    "text_encoder.token_embedding.weight": (49408, 768),
    "text_encoder.positional_embedding": (32, 768),
    "text_encoder.transformer.resblocks.11.attn.in_proj_bias": (2304,),
    "text_encoder.transformer.resblocks.11.ln_2.weight": (768,),
    "text_encoder.ln_final.weight": (768,),
    "text_encoder.text_projection": (768, 768),
}


@pytest.fixture(scope="module")
def tiny():
    return ve.tiny_viclip_encoder()


def _videos(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (17, 48, 64, 3), dtype=np.uint8),
            rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)]


def test_full_size_viclip_has_the_released_checkpoint_keys_and_shapes():
    with torch.device("meta"):
        model = ve.ViCLIPModel(ve.ViCLIPConfig())
    state = model.state_dict()
    for key, shape in RELEASED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(".ls_" in k or "attn_mask" in k for k in state)  # nothing the file lacks
    assert sum(k.startswith("vision_encoder.transformer.resblocks.") and k.endswith("ln_1.weight")
               for k in state) == 24
    # sizes read back from the shapes alone
    assert ve.ViCLIPConfig.from_state_dict(state) == ve.ViCLIPConfig()


def test_tiny_checkpoint_round_trip_in_released_format(tiny, tmp_path):
    path = tmp_path / "ViClip-tiny.pth"
    ve.save_viclip_checkpoint(tiny, str(path))
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"model"} and "vision_encoder.conv1.weight" in raw["model"]
    loaded = build_video_encoder(str(tmp_path))  # a folder holding one checkpoint
    assert loaded.config == tiny.config
    videos = _videos()
    np.testing.assert_array_equal(loaded.embed_videos(videos), tiny.embed_videos(videos))
    np.testing.assert_array_equal(loaded.embed_texts(["a red kite"]), tiny.embed_texts(["a red kite"]))


def test_embeddings_are_unit_rows_and_depend_on_content_and_order(tiny):
    videos = _videos()
    embeddings = tiny.embed_videos(videos)
    assert embeddings.shape == (2, ve.TINY_VICLIP["embed_dim"]) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    again = tiny.embed_videos([videos[0].copy()])
    np.testing.assert_allclose(again[0], embeddings[0], atol=1e-6)
    # the temporal position embedding makes frame order matter (joint space-time attention)
    reversed_order = tiny.embed_videos([videos[0][::-1].copy()])
    assert not np.allclose(reversed_order[0], embeddings[0], atol=1e-4)
    texts = tiny.embed_texts(["a lighthouse at night", "a dog in a park"])
    assert texts.shape == (2, ve.TINY_VICLIP["embed_dim"])
    assert not np.allclose(texts[0], texts[1])


def test_text_is_cut_to_the_32_token_context(tiny):
    # sot + 100 words + eot is cut to sot + 30 words + eot: the same tokens as 30 words
    long, cut = tiny.embed_texts(["word " * 100, "word " * 30])
    np.testing.assert_allclose(long, cut, atol=1e-6)


def test_frame_sampling_matches_the_viclip_demo_and_repeats_short_videos():
    assert ve.sample_frame_indices(81, 8) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert ve.sample_frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert ve.sample_frame_indices(8, 8) == list(range(8))
    assert ve.sample_frame_indices(5, 8) == [0, 0, 1, 1, 2, 3, 3, 4]
    assert ve.sample_frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ve.VideoEncoderError, match="at least one frame"):
        ve.sample_frame_indices(0, 8)


class ColourEmbedderFake:
    """Stand-in CLIP (no weights here): embeds an image as its mean RGB, texts by length."""

    name = "fake-colour"

    def embed_images(self, images):
        means = np.asarray(images, dtype=np.float64).mean(axis=(1, 2))
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)

    def embed_texts(self, texts):
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)


def test_clip_frame_average_is_the_renormalised_mean_of_sampled_frames():
    encoder = ve.ClipFrameAverageEncoder(ColourEmbedderFake(), frames_per_video=2)
    # 4 frames: sampled 0 and 2 -> pure red and pure green; frames 1 and 3 are ignored
    video = np.zeros((4, 2, 2, 3), np.uint8)
    video[0, ..., 0] = 200
    video[1, ..., 2] = 255
    video[2, ..., 1] = 10
    video[3, ..., 2] = 255
    embedding = encoder.embed_videos([video])[0]
    np.testing.assert_allclose(embedding, [2 ** -0.5, 2 ** -0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(encoder.embed_texts(["ab"])[0], np.array([2, 1, 0]) / 5 ** 0.5,
                               atol=1e-6)


def test_tiny_clip_frame_average_over_the_projects_clip_embedder():
    encoder = build_video_encoder("tiny-clip")
    embeddings = encoder.embed_videos(_videos())
    assert embeddings.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert encoder.embed_texts(["a boat"]).shape[1] == embeddings.shape[1]


def test_bad_inputs_and_checkpoints_raise_clear_errors(tiny, tmp_path):
    with pytest.raises(ve.VideoEncoderError, match="video 1 must be a uint8"):
        tiny.embed_videos([_videos()[0], np.zeros((4, 8, 8, 3), np.float32)])
    with pytest.raises(ve.VideoEncoderError, match="not one string"):
        tiny.embed_texts("a single string")
    with pytest.raises(ve.VideoEncoderError, match="not found"):
        ve.ViCLIPEncoder.from_checkpoint(str(tmp_path / "missing.pth"))
    state = {k: v for k, v in tiny.model.state_dict().items() if "resblocks.1.mlp" not in k}
    state["vision_encoder.extra"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ve.VideoEncoderError, match="missing .*resblocks.1.mlp.*unexpected.*extra"):
        ve.ViCLIPEncoder.from_checkpoint(str(tmp_path / "broken.pth"))
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ve.VideoEncoderError, match="not a ViCLIP checkpoint"):
        ve.ViCLIPEncoder.from_checkpoint(str(tmp_path / "other.pth"))
    with pytest.raises(ve.VideoEncoderError, match="unknown video encoder"):
        build_video_encoder("no-such-encoder")


def test_one_frame_through_the_vision_tower_equals_open_clips_image_vit(tiny):
    """With one frame and a zero temporal embedding, ViCLIP's tower is a plain CLIP ViT:
    the same weights in open_clip's VisionTransformer give the same embedding."""
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

    cfg = tiny.config
    tower = tiny.model.vision_encoder
    vit = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                            cfg.vision_heads, cfg.mlp_ratio, output_dim=cfg.embed_dim,
                            act_layer=QuickGELU, norm_layer=LayerNorm).eval()
    state = {k: v for k, v in tower.state_dict().items() if k != "temporal_positional_embedding"}
    state["conv1.weight"] = state["conv1.weight"][:, :, 0]
    vit.load_state_dict(state)
    saved = tower.temporal_positional_embedding.detach().clone()
    pixels = torch.randn(2, 3, 1, cfg.image_size, cfg.image_size)
    try:
        with torch.no_grad():
            tower.temporal_positional_embedding.zero_()
            ours = tower(pixels)
            reference = vit(pixels[:, :, 0])
    finally:
        with torch.no_grad():
            tower.temporal_positional_embedding.copy_(saved)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
