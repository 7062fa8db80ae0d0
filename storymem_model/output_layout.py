"""Where a rendered story's files live; every key is deterministic.

    {out}/{story_id}/{config_hash}/
        config.json                          the RenderConfig (all fields)
        script.json                          the validated script, ST-Bench form
        shots/{scene:02d}_{shot:02d}.mp4     one H.264 video per shot
        shots/{scene:02d}_{shot:02d}.json    the shot's row; written last = shot checkpoint
        keyframes/{keyframe_id}.png          selected keyframes, lossless; ids are
                                             scene{SSS}-shot{TTT}-frame{FFFF}
        memory/{scene:02d}_{shot:02d}/bank/  the memory bank after the latest shot
        memory/{scene:02d}_{shot:02d}/last_frames.png  that shot's last 5 frames stacked
                                             top to bottom (lossless), for MI2V/MM2V
                                             continuation after a resume
        {story_id}.mp4                       every shot stitched, in order, nothing else
        shots.parquet                        one row per shot
        _COMMITTED.json                      written last: file list, sizes, sha256
"""
from __future__ import annotations

from storymem_model import storage

CONFIG_FILE = "config.json"
SCRIPT_FILE = "script.json"
SHOTS_PARQUET = "shots.parquet"
SHOTS_DIR = "shots"
KEYFRAMES_DIR = "keyframes"
MEMORY_DIR = "memory"
COMMIT_MARKER = storage.COMMIT_MARKER


def story_uri(out_uri: str, story_id: str, config_hash: str) -> str:
    return storage.join(out_uri, story_id, config_hash)


def shot_name(scene: int, shot: int) -> str:
    return f"{scene:02d}_{shot:02d}"


def shot_video_key(scene: int, shot: int) -> str:
    return f"{SHOTS_DIR}/{shot_name(scene, shot)}.mp4"


def shot_record_key(scene: int, shot: int) -> str:
    return f"{SHOTS_DIR}/{shot_name(scene, shot)}.json"


def keyframe_key(kf_id: str) -> str:
    return f"{KEYFRAMES_DIR}/{kf_id}.png"


def memory_key(scene: int, shot: int) -> str:
    return f"{MEMORY_DIR}/{shot_name(scene, shot)}"


def story_video_key(story_id: str) -> str:
    return f"{story_id}.mp4"
