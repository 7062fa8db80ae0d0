"""Evaluation encoder specs (strict, JSON round trip, no torch), the encoder factory (tiny
encoders, one CLIP shared by the aesthetic predictor and the frame average), and the
eval.parquet row type whose schema is the file format."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from storymem_model.evaluation.encoder_factory import build_encoders
from storymem_model.evaluation.encoder_spec import (AestheticSpec, EvalEncoderSpec,
                                                    VideoEncoderSpec)
from storymem_model.evaluation.rows import EvalRow
from storymem_model.spec_json import SpecError

torch.set_num_threads(1)


def test_spec_round_trips_through_json_and_knows_when_one_clip_serves_both():
    spec = EvalEncoderSpec(
        video=VideoEncoderSpec(kind="clip", clip_checkpoint="/m/ViT-L-14.pt"),
        aesthetic=AestheticSpec(head="/m/sa_0_4_vit_l_14_linear.pth",
                                clip_checkpoint="/m/ViT-L-14.pt", frames=4),
        device="cpu")
    again = EvalEncoderSpec.from_json(spec.to_json())
    assert again == spec and isinstance(again.video, VideoEncoderSpec)
    assert spec.shares_clip
    other = spec.replace(video=spec.video.replace(clip_checkpoint="/m/other.pt"))
    assert not other.shares_clip
    viclip = spec.replace(video=VideoEncoderSpec(viclip="/m/ViClip-InternVid-10M-FLT.pth"))
    assert not viclip.shares_clip and not viclip.video.is_tiny
    with pytest.raises(SpecError, match="unknown field"):
        EvalEncoderSpec.from_dict({**spec.to_dict(), "colour": "red"})


@pytest.mark.parametrize(("build", "message"), [
    (lambda: AestheticSpec(), "no aesthetic predictor"),
    (lambda: AestheticSpec(head="/m/head.pth"), "needs both its head and its CLIP"),
    (lambda: AestheticSpec(preset="tiny", frames=0), "frames must be >= 1, got 0"),
    (lambda: AestheticSpec(preset="huge"), "preset must be one of tiny"),
    (lambda: VideoEncoderSpec(), "no video-text encoder"),
    (lambda: VideoEncoderSpec(kind="clip"), "needs clip_checkpoint"),
    (lambda: VideoEncoderSpec(kind="clip", preset="tiny", viclip="/m/v.pth"),
     "viclip is a ViCLIP checkpoint"),
    (lambda: VideoEncoderSpec(preset="tiny", clip_checkpoint="/m/c.pt"),
     "clip_checkpoint is for the CLIP frame average"),
    (lambda: VideoEncoderSpec(kind="xclip", preset="tiny"), "kind must be one of viclip, clip"),
    (lambda: EvalEncoderSpec(VideoEncoderSpec(preset="tiny"), AestheticSpec(preset="tiny"),
                             device=""), "device must be a non-empty string"),
])
def test_unusable_specs_are_refused_naming_the_problem(build, message):
    with pytest.raises(SpecError, match=message):
        build()


def test_specs_import_without_torch():
    code = ("import sys; import storymem_model.evaluation.encoder_spec; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_encoders_from_a_spec():
    spec = EvalEncoderSpec(video=VideoEncoderSpec(kind="clip", preset="tiny"),
                           aesthetic=AestheticSpec(preset="tiny", frames=3), device="cpu")
    encoders = build_encoders(spec)
    assert encoders.video.name == "clip-frame-average:open_clip:storymem-tiny-clip:random-seed0"
    assert encoders.aesthetic.name.startswith("aesthetic:tiny")
    assert encoders.aesthetic_frames == 3 and encoders.any_tiny and encoders.spec == spec
    video = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    assert encoders.video.embed_videos([video]).shape[0] == 1
    assert encoders.aesthetic.score_images(video[:2]).shape == (2,)


def test_frame_average_shares_the_aesthetic_predictors_clip(tmp_path):
    """One CLIP file for both: it is loaded once (the tiny CLIP architecture saved as a
    checkpoint stands in for ViT-L/14)."""
    from storymem_model.scorers.clip_embedder import TINY_CLIP_NAME, OpenClipEmbedder

    clip_file = tmp_path / "clip.pt"
    torch.save(OpenClipEmbedder.tiny().model.state_dict(), clip_file)
    head_file = tmp_path / "head.pth"
    torch.save({"weight": torch.full((1, 64), 0.1), "bias": torch.tensor([5.0])}, head_file)
    spec = EvalEncoderSpec(
        video=VideoEncoderSpec(kind="clip", clip_checkpoint=str(clip_file),
                               clip_model=TINY_CLIP_NAME),
        aesthetic=AestheticSpec(head=str(head_file), clip_checkpoint=str(clip_file),
                                clip_model=TINY_CLIP_NAME),
        device="cpu")
    encoders = build_encoders(spec)
    assert encoders.video.embedder is encoders.aesthetic.embedder
    assert not encoders.any_tiny
    copy = tmp_path / "copy.pt"
    copy.write_bytes(clip_file.read_bytes())
    unshared = build_encoders(spec.replace(video=spec.video.replace(clip_checkpoint=str(copy))))
    assert unshared.video.embedder is not unshared.aesthetic.embedder


def test_eval_row_schema_is_the_eval_parquet_format():
    f64, i32, s = pa.float64(), pa.int32(), pa.string()
    assert EvalRow.arrow_schema() == pa.schema([
        ("level", s), ("method", s), ("config_hash", s), ("story_id", s), ("story_name", s),
        ("scene", i32), ("shot", i32), ("shot_index", i32), ("prompt", s),
        ("num_shots", i32), ("num_frames", i32), ("num_stories", i32),
        ("aesthetic_quality", f64), ("prompt_following_global", f64),
        ("prompt_following_single_shot", f64), ("consistency_all_pairs", f64),
        ("consistency_top10", f64), ("consistency_to_others", f64), ("num_shot_pairs", i32),
        ("consistency_matrix", pa.list_(f64)), ("global_text_source", s),
        ("video_encoder", s), ("aesthetic_scorer", s), ("story_uri", s), ("error", s)])
    rows = [EvalRow(level="benchmark", method="storymem", num_stories=2,
                    consistency_all_pairs=float("nan")),
            EvalRow.not_evaluated("kite", "abc", "/o/kite/abc", "not committed")]
    table = EvalRow.table(rows).to_pylist()
    assert table[0]["num_stories"] == 2 and table[0]["error"] is None
    assert table[1]["level"] == "story" and table[1]["error"] == "not committed"
    with pytest.raises(ValueError, match="'shots' is not a valid EvalLevel"):
        EvalRow(level="shots")
