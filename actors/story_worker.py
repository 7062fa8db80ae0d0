"""The story worker: a Ray actor that loads the pipeline once and renders stories in turn.

Each worker holds one loaded `StoryMemPipeline` (on its GPU share, or the CPU) and a
`StoryRunner` whose scorers are proxies to the shared scorer actor pools (`scorer_pools`:
{"clip": [handles], "gate": [handles], "client_index": this worker's slot index, which
picks its scorer actors and lets them batch without waiting for absent workers}). `render_story`
renders one whole story through the runner, which checkpoints after every shot; the
story's memory bank (and its keyframe latents, cached on the worker's device) lives in the
worker only while that story renders. When a worker dies mid-story, the driver sends the
story again (to the restarted or a replacement worker) and the runner resumes from the
last committed shot.

Progress: one event per finished shot goes to the `ProgressReporter` actor (fire and
forget). Log lines go to the worker's stderr (Ray's per-worker log file) and, as events,
to the driver, which keeps one log file per worker.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import time
import traceback
from typing import Any, Callable

logger = logging.getLogger("storymem.story_worker")

PipelineFactory = Callable[[argparse.Namespace], Any]


class StoryWorker:
    """Wrap with `ray.remote(...)`; see `pipelines/batch_render.py` for the options."""

    def __init__(self, worker_name: str, model_args: argparse.Namespace, scorer_pools: dict,
                 progress=None, pipeline_factory: PipelineFactory | None = None,
                 torch_threads: int | None = 1, consistency: bool = False):
        started = time.monotonic()
        self.worker_name = worker_name
        self.progress = progress
        self.consistency = consistency
        self._setup_logging()
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        from storymem_model.cli_render import (config_from_args, pipeline_from_args,
                                               references_from_args)
        from storymem_model.runner import StoryRunner

        from actors.scorer_proxies import keyframe_scorers_from_pools

        model_args = _with_device(model_args)
        references = references_from_args(model_args)
        self.pipeline = (pipeline_factory or pipeline_from_args)(model_args)
        # The scorer actors load their models meanwhile; wait for them only now.
        scorers = keyframe_scorers_from_pools(scorer_pools["clip"], scorer_pools["gate"],
                                              client_index=scorer_pools.get("client_index"))
        self.scorers = scorers
        self.config = config_from_args(model_args, self.pipeline, scorers, references)
        self.runner = StoryRunner(self.pipeline, scorers, self.config, references=references)
        self.load_s = time.monotonic() - started
        self._log("ready: model %s on %s, config %s, loaded in %.1f s (pid %d)",
                  self.config.model_id, getattr(self.pipeline, "device", "?"),
                  self.runner.config_hash, self.load_s, os.getpid())

    # ------------------------------------------------------------------------------
    def ping(self) -> dict:
        """Who and where this worker is, and the config it renders with."""
        return {"worker": self.worker_name, "pid": os.getpid(), "host": socket.gethostname(),
                "config_hash": self.runner.config_hash, "config": self.config.to_dict(),
                "load_s": self.load_s}

    def render_story(self, script, out_uri: str, attempt: int = 1) -> dict:
        """Render (or resume) one story; returns a small summary row (no frames)."""
        started = time.monotonic()
        self._log("story %s: attempt %d, %d shots", script.story_id, attempt, len(script.shots))
        self._event({"kind": "story_started", "story_id": script.story_id,
                     "attempt": attempt, "shots_total": len(script.shots)})
        try:
            result = self.runner.render(script, out_uri, progress=self._shot_done)
        except Exception as exc:
            self._log("story %s: attempt %d failed: %s: %s\n%s", script.story_id, attempt,
                      type(exc).__name__, exc, traceback.format_exc(), level=logging.ERROR)
            raise
        row = {
            "story_id": result.story_id, "config_hash": result.config_hash,
            "story_uri": result.story_uri, "video_uri": result.video_uri,
            "parquet_uri": result.parquet_uri, "status": result.status,
            "num_shots": result.shots_total, "shots_rendered": result.shots_rendered,
            "wall_s": time.monotonic() - started, "worker": self.worker_name,
        }
        if self.consistency:
            row.update(self._consistency(result))
        self._log("story %s: %s (%d shots rendered now) in %.1f s", result.story_id,
                  result.status, result.shots_rendered, row["wall_s"])
        return row

    # ------------------------------------------------------------------------------
    def _shot_done(self, event: dict) -> None:
        self._log("story %s: shot %d/%d (scene %d shot %d, %s) in %.1f s", event["story_id"],
                  event["shot_index"] + 1, event["shots_total"], event["scene"],
                  event["shot"], event["mode"], event["seconds"])
        self._event({"kind": "shot_done", **event})

    def _consistency(self, result) -> dict:
        """Per-story cross-shot consistency (storymem_model.evaluation.metrics.story_consistency) on
        CLIP frame-average shot embeddings, computed through the shared CLIP actors."""
        from storymem_model import storage
        from storymem_model.evaluation.metrics import story_consistency
        from storymem_model.evaluation.video_encoders import ClipFrameAverageEncoder
        from storymem_model.video_io import decode_mp4

        encoder = ClipFrameAverageEncoder(self.scorers.embedder)
        videos = [decode_mp4(storage.read_bytes(row["video_uri"])) for row in _rows(result)]
        scores = story_consistency(encoder.embed_videos(videos))
        return {"consistency_all_pairs": scores["consistency_all_pairs"],
                "consistency_top10": scores["consistency_top10"]}

    def _event(self, event: dict) -> None:
        if self.progress is not None:
            self.progress.report.remote({"worker": self.worker_name, "pid": os.getpid(),
                                         **event})

    def _log(self, message: str, *args, level: int = logging.INFO) -> None:
        text = message % args if args else message
        logger.log(level, "[%s] %s", self.worker_name, text)
        self._event({"kind": "log", "level": logging.getLevelName(level), "message": text})

    @staticmethod
    def _setup_logging() -> None:
        root = logging.getLogger("storymem")
        if not root.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            root.addHandler(handler)
            root.setLevel(logging.INFO)


def _rows(result) -> list[dict]:
    """The story's shot rows: from the result, or (skipped story) from its shots.parquet."""
    if result.rows:
        return sorted(result.rows, key=lambda r: r["shot_index"])
    import io

    import pyarrow.parquet as pq

    from storymem_model import storage

    table = pq.read_table(io.BytesIO(storage.read_bytes(result.parquet_uri)))
    return sorted(table.to_pylist(), key=lambda r: r["shot_index"])


def _with_device(args: argparse.Namespace) -> argparse.Namespace:
    """Use the GPU Ray gave this actor when no --device was named."""
    if getattr(args, "device", None):
        return args
    try:
        import ray

        gpus = ray.get_gpu_ids()
    except Exception:  # not inside Ray (direct use in tests): keep the default
        gpus = []
    args = argparse.Namespace(**vars(args))
    args.device = "cuda" if gpus else "cpu"
    return args
