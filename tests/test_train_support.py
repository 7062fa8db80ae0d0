"""Helpers of the training tests (tests/test_train_*.py); no tests here.

Clips are made in code: short H.264 files whose frames are a coloured gradient plus a
little noise, so clips made from one base look alike (one group by CLIP similarity) and
clips of different bases do not. The training geometry is the small tiny one of the other
Ray tests: 32x32, 9 frames at 16 fps (latents 16 x 3 x 4 x 4).
"""
from __future__ import annotations

import json

import numpy as np

from storymem_model import storage
from storymem_model.video_io import encode_mp4

HEIGHT, WIDTH, NUM_FRAMES, FPS = 32, 32, 9, 16
LATENT_SHAPE = [16, 3, 4, 4]
BASE_COLOURS = ([200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200], [200, 40, 200])


def clip_bytes(base: int, variant: int, *, frames: int = 14, height: int = 40, width: int = 48,
               fps: int = 16) -> bytes:
    """An mp4 of `frames` frames: base colour `base` with a gradient, seeded noise, a drift."""
    rng = np.random.default_rng(1000 * base + variant)
    colour = np.asarray(BASE_COLOURS[base % len(BASE_COLOURS)], float)
    image = colour[None, None] + np.linspace(0, 60, 48)[None, :, None] + np.linspace(0, 30, 40)[:, None, None]
    video = [np.clip(image + rng.normal(0, 8, image.shape) + 2 * i, 0, 255).astype(np.uint8)
             for i in range(frames)]
    return encode_mp4(np.stack(video)[:, :height, :width], fps)


def write_clips(folder: str, specs: list[dict]) -> str:
    """Write clips and a JSONL manifest under `folder` (local or s3://); returns its URI.

    Each spec: name, caption, and either base/variant (a good clip, optional frames/height/
    width) or `data` (raw bytes), plus optional group_id/order."""
    rows = []
    for spec in specs:
        uri = storage.join(folder, spec["name"])
        data = spec.get("data")
        if data is None:
            data = clip_bytes(spec["base"], spec.get("variant", 0),
                              **{k: spec[k] for k in ("frames", "height", "width") if k in spec})
        storage.write_bytes(uri, data)
        row = {"clip_uri": uri, "caption": spec["caption"]}
        row.update({k: spec[k] for k in ("group_id", "order") if k in spec})
        rows.append(row)
    manifest = storage.join(folder, "clips.jsonl")
    storage.write_bytes(manifest, "\n".join(json.dumps(r) for r in rows).encode("utf-8"))
    return manifest


def prepare_spec(clips: str, out: str, **overrides):
    from storymem_model.specs import ModelSpec, ScorerSpec
    from storymem_model.training.specs import PrepareSpec

    values = dict(clips=clips, out=out, model=ModelSpec(preset="tiny"), scorers=ScorerSpec(preset="tiny"),
                  height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, fps=FPS, workers=2,
                  cpus_per_worker=0.5, rows_per_shard=4)
    values.update(overrides)
    return PrepareSpec(**values)


def fit_spec(data: str, out: str, **overrides):
    """The fit of the Ray tests: both experts, 2 CPU workers, a high learning rate for the
    tiny model so a short run shows a clear drop."""
    from storymem_model.specs import ModelSpec
    from storymem_model.training.specs import FitSpec

    values = dict(data=data, out=out, model=ModelSpec(preset="tiny"), steps=48, expert="both", workers=2,
                  cpus_per_worker=0.5, lr=4e-3, warmup_steps=4, checkpoint_every=12, seed=7, max_memory=4,
                  mi2v_prob=0.4, mm2v_prob=0.3)
    values.update(overrides)
    return FitSpec(**values)


def lora_files(lora_dir: str) -> dict[str, bytes]:
    from storymem_model.training.lora import EXPERT_FILES

    return {name: storage.read_bytes(storage.join(lora_dir, name)) for name in EXPERT_FILES.values()}
