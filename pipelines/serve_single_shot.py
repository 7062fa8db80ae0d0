"""`POST /v1/shots`: one shot outside any story, with the batch code's generation and
keyframe selection.

The request's memory images condition the shot (M2V; MI2V with a first frame, MM2V with
5 motion frames, T2V when the server has a T2V model). Every frame is embedded and
gate-scored once and the keyframes are selected with the server's RenderConfig thresholds
(`select_keyframes`, duplicates of the given memory dropped), exactly like a story shot.

Files, under the server's storage root:
    shots/{scope}/{shot_id}/shot.mp4, keyframes/f{index:03d}.png, shot.json
"""
from __future__ import annotations

import base64
import json
import secrets
import time

import numpy as np
from PIL import Image

from pipelines.serve_errors import ServeRequestError
from storymem_model import storage
from storymem_model.render_config import SAMPLING_KEYS, ConfigError

GEOMETRY_KEYS = ("height", "width", "num_frames")


def new_shot_id() -> str:
    return secrets.token_urlsafe(18)


def resolve_mode(request: dict, has_first: bool, has_motion: bool, has_t2v: bool) -> str:
    mode = request.get("mode", "auto")
    if mode == "auto":
        mode = "mi2v" if has_first else "mm2v" if has_motion else "m2v"
    if mode == "t2v" and not has_t2v:
        raise ServeRequestError(422, "t2v_unavailable",
                                "mode t2v needs a server started with --t2v-model-dir; "
                                "use m2v (memory-conditioned) instead")
    return mode


def shot_config(config, overrides: dict):
    """The server's RenderConfig with the request's bounded sampling/geometry overrides."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    geometry = {k: overrides.pop(k) for k in GEOMETRY_KEYS if k in overrides}
    sampling = {**config.sampling, **{k: v for k, v in overrides.items() if k in SAMPLING_KEYS}}
    changes = dict(sampling=sampling, **geometry)
    if getattr(config, "t2v_sampling", None):
        # T2V shots use the T2V experts' own settings; a request's overrides reach them
        # the way render's flags do (RenderConfig's shared keys only).
        from storymem_model.render_config import T2V_SHARED_SAMPLING_KEYS

        changes["t2v_sampling"] = {**config.t2v_sampling, **{
            k: v for k, v in overrides.items() if k in T2V_SHARED_SAMPLING_KEYS}}
    try:
        return config.replace(**changes)
    except ConfigError as exc:
        raise ServeRequestError(422, "invalid_sampling", str(exc)) from None


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a conditioning frame to the shot size (bicubic), unchanged when it fits."""
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def embed_each_size(embedder, images: list[np.ndarray]) -> np.ndarray | None:
    """Embeddings of images that may differ in size (one call per size, order kept)."""
    if not images:
        return None
    out: list = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    for indices in by_shape.values():
        vectors = np.asarray(embedder.embed_images(np.stack([images[i] for i in indices])))
        for i, vector in zip(indices, vectors):
            out[i] = vector
    return np.stack(out).astype(np.float32)


def render_single_shot(pipeline, scorers, config, root: str, scope: str, request: dict,
                       memory: list[np.ndarray], first_frame, motion_frames) -> dict:
    """Generate, select keyframes, write and describe one shot (runs in a worker thread)."""
    from storymem_model.keyframe_selection import select_keyframes
    from storymem_model.runner import image_png
    from storymem_model.video_io import encode_mp4

    has_t2v = bool(getattr(pipeline, "has_t2v", False))
    mode = resolve_mode(request, first_frame is not None, motion_frames is not None, has_t2v)
    cfg = shot_config(config, request.get("sampling") or {})
    expected = cfg.frames_per_shot[mode]
    if expected < 1:
        raise ServeRequestError(422, "invalid_sampling",
                                f"num_frames {cfg.num_frames} leaves no frame in mode {mode}")
    started = time.perf_counter()
    sampling = cfg.sampling
    if mode == "t2v" and getattr(cfg, "t2v_sampling", None):
        sampling = cfg.t2v_sampling  # as the story runner does for T2V shots
    kwargs = dict(seed=int(request.get("seed", 0)), rope_shift=cfg.rope_shift,
                  negative_prompt=request.get("negative_prompt") or cfg.negative_prompt,
                  height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                  **sampling)
    if mode == "t2v":
        kwargs["use_t2v"] = True
    elif memory:
        kwargs["memory"] = list(memory)
    if mode == "mi2v":
        kwargs["first_frame"] = fit_image(first_frame, cfg.height, cfg.width)
    elif mode == "mm2v":
        kwargs["motion_frames"] = np.stack([fit_image(f, cfg.height, cfg.width)
                                            for f in motion_frames])
    frames = np.asarray(pipeline.generate_shot(request["prompt"], **kwargs))
    generated = time.perf_counter()

    chosen: list[int] = []
    scores = None
    if request.get("select_keyframes", True):
        embeddings = np.asarray(scorers.embedder.embed_images(frames), np.float32)
        scores = np.asarray(scorers.gate.score_images(frames), np.float32)
        chosen = [int(i) for i in select_keyframes(
            embeddings, scores, embed_each_size(scorers.embedder, list(memory)),
            threshold=cfg.keyframe_threshold, step=cfg.keyframe_step,
            max_keyframes=cfg.max_keyframes, min_score=cfg.gate_threshold,
            duplicate_threshold=cfg.duplicate_threshold)]
    selected = time.perf_counter()

    shot_id = new_shot_id()
    base = storage.join(root, "shots", scope, shot_id)
    video = encode_mp4(frames, cfg.fps)
    video_uri = storage.join(base, "shot.mp4")
    storage.write_bytes(video_uri, video)
    want = request.get("return_video", "both")
    keyframes = []
    for index in chosen:
        png = image_png(frames[index])
        uri = storage.join(base, "keyframes", f"f{index:03d}.png")
        storage.write_bytes(uri, png)
        keyframes.append({"frame_index": index, "keyframe_id": f"{shot_id}_f{index:03d}",
                          "score": float(scores[index]), "image_uri": uri,
                          "image_base64": base64.b64encode(png).decode("ascii")})
    response = {
        "shot_id": shot_id, "mode": mode, "seed": kwargs["seed"],
        "num_frames": int(frames.shape[0]), "height": int(frames.shape[1]),
        "width": int(frames.shape[2]), "fps": cfg.fps,
        "video_uri": video_uri if want in ("uri", "both") else None,
        "video_sha256": storage.sha256_hex(video),
        "keyframes": keyframes, "memory_count": len(memory),
        "model_id": cfg.model_id, "lora_id": cfg.lora_id,
        "timings_s": {"generate": generated - started, "select": selected - generated,
                      "write": time.perf_counter() - selected},
    }
    record = {k: v for k, v in response.items() if k != "keyframes"}
    record["keyframes"] = [{k: v for k, v in kf.items() if k != "image_base64"} for kf in keyframes]
    record["prompt"] = request["prompt"]
    storage.write_bytes(storage.join(base, "shot.json"), json.dumps(record, sort_keys=True).encode())
    if want in ("base64", "both"):
        response["video_base64"] = base64.b64encode(video).decode("ascii")
    return response
