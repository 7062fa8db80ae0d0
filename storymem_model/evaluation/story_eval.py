"""One story render scored with the paper's ST-Bench metrics.

With a video-text encoder (ViCLIP in the paper) and the aesthetic predictor (LAION, on
CLIP ViT-L/14), for a committed render (`renders.RenderedStory`):

- each shot video (`shots/*.mp4`, decoded: what viewers see) gives one video embedding
  from the encoder's sampled frames (8 for ViCLIP, `video_encoders.sample_frame_indices`)
  and its prompt one text embedding; single-shot prompt following is their cosine;
- the whole story (the shots back to back, exactly the stitched `{story_id}.mp4`) gives one
  embedding from frames sampled over its full length; the story text is the script's
  `story_overview`, or the shot prompts joined with spaces when it has none
  (`global_text_source` says which); global prompt following is their cosine. ViCLIP reads
  32 tokens, so a long overview counts by its beginning;
- every frame of every shot (or `AestheticSpec.frames` evenly spaced ones per shot) is
  scored by the aesthetic predictor; aesthetic quality is the mean / 10;
- cross-shot consistency comes from the shot embeddings (`metrics.story_consistency`).

`story_consistency_for_render` gives only the consistency, for tables that have a story
folder and an encoder at hand (the batch's stories table).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from storymem_model.evaluation import metrics
from storymem_model.evaluation.encoder_factory import Encoders
from storymem_model.evaluation.renders import RenderedStory, decode_shot, load_render
from storymem_model.evaluation.rows import EvalLevel, EvalRow
from storymem_model.evaluation.video_encoders import VideoTextEncoder, sample_frame_indices


def evaluate_story(story: RenderedStory, encoders: Encoders) -> tuple[list[EvalRow], EvalRow]:
    """(shot rows, story row) for one committed render."""
    encoder, aesthetic = encoders.video, encoders.aesthetic
    counts = [int(s.num_frames) if s.num_frames else None for s in story.shots]
    count_known = all(c is not None for c in counts)
    per_video = encoder.frames_per_video
    global_positions: dict[int, list[int]] = defaultdict(list)  # shot -> local frames
    if count_known:
        starts = np.cumsum([0, *counts])
        for index in sample_frame_indices(int(starts[-1]), per_video):
            shot = int(np.searchsorted(starts, index, side="right") - 1)
            global_positions[shot].append(index - int(starts[shot]))

    shot_samples, global_frames, scores_per_shot, decoded_counts = [], [], [], []
    all_frames_kept = []  # only when shots.parquet lacks frame counts
    for i, shot in enumerate(story.shots):
        frames = decode_shot(story, shot)
        decoded_counts.append(frames.shape[0])
        shot_samples.append(frames[sample_frame_indices(frames.shape[0], per_video)])
        global_frames += [frames[j] for j in global_positions.get(i, [])]
        if not count_known:
            all_frames_kept.append(frames)
        if encoders.aesthetic_frames:
            picks = sorted(set(sample_frame_indices(frames.shape[0], encoders.aesthetic_frames)))
            scored = frames[picks]
        else:
            scored = frames
        scores_per_shot.append(np.asarray(aesthetic.score_images(scored), dtype=np.float64))
    if not count_known:
        story_video = np.concatenate(all_frames_kept)
        global_frames = list(story_video[sample_frame_indices(len(story_video), per_video)])

    prompts = [str(s.prompt) for s in story.shots]
    shot_embeddings = encoder.embed_videos(shot_samples)
    single = metrics.prompt_following(shot_embeddings, encoder.embed_texts(prompts))
    if story.overview:
        story_text, text_source = story.overview, "overview"
    else:
        story_text, text_source = " ".join(prompts), "prompts"
    story_embedding = encoder.embed_videos([np.stack(global_frames)])
    global_following = float(metrics.prompt_following(
        story_embedding, encoder.embed_texts([story_text]))[0])
    consistency = metrics.story_consistency(shot_embeddings)
    matrix = metrics.similarity_matrix(shot_embeddings)
    common = dict(method=story.method, config_hash=story.config_hash, story_id=story.story_id,
                  story_name=story.story_name, video_encoder=encoder.name,
                  aesthetic_scorer=aesthetic.name, story_uri=story.uri)
    shot_rows = []
    for i, shot in enumerate(story.shots):
        others = np.delete(matrix[i], i)
        shot_rows.append(EvalRow(
            level=EvalLevel.SHOT.value, **common, scene=int(shot.scene), shot=int(shot.shot),
            shot_index=int(shot.shot_index), prompt=prompts[i], num_frames=decoded_counts[i],
            aesthetic_quality=metrics.aesthetic_quality(scores_per_shot[i]),
            prompt_following_single_shot=float(single[i]),
            consistency_to_others=float(others.mean()) if others.size else math.nan))
    story_row = EvalRow(
        level=EvalLevel.STORY.value, **common, num_shots=len(story.shots),
        num_frames=int(sum(decoded_counts)),
        aesthetic_quality=metrics.aesthetic_quality(np.concatenate(scores_per_shot)),
        prompt_following_global=global_following,
        prompt_following_single_shot=float(np.mean(single)),
        consistency_all_pairs=consistency["consistency_all_pairs"],
        consistency_top10=consistency["consistency_top10"],
        num_shot_pairs=consistency["num_shot_pairs"],
        consistency_matrix=matrix.reshape(-1).tolist(), global_text_source=text_source)
    return shot_rows, story_row


def story_consistency_for_render(story_uri: str, encoder: VideoTextEncoder) -> dict:
    """Cross-shot consistency of one committed story folder `{out}/{story_id}/{hash}`:
    `metrics.story_consistency`'s dict {"consistency_all_pairs", "consistency_top10",
    "num_shot_pairs"}."""
    uri = story_uri.rstrip("/")
    parts = uri.split("/")
    story = load_render(uri, parts[-2], parts[-1])
    videos = [decode_shot(story, shot) for shot in story.shots]
    return metrics.story_consistency(encoder.embed_videos(videos))
