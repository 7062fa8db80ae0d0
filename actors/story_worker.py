"""The story worker: a Ray actor that loads the pipeline once and renders stories in turn.

`StoryWorker(worker_name, render, scorer_pools, progress)` receives the resolved
`RenderSpec` (its model device already chosen at the edge from the GPUs a worker gets),
builds the pipeline with `model_loading.build_pipeline(render.model)` and the runner with
`runner.open_runner(render, pipeline, scorers=proxies)`, which checks that the loaded model
is the one the config was resolved for; the proxies check the same of the shared scorer
actors (`actors.scorer_proxies`). Without memory there are no scorers and no pools.

`render_story` renders one whole story through the runner, which checkpoints after every
shot; the story's memory bank (and its keyframe latents, cached on the worker's device)
lives in the worker only while that story renders. When a worker dies mid-story, the
driver sends the story again (to the restarted or a replacement worker) and the runner
resumes from the last committed shot.

Progress: `StoryStarted`, one `ShotRendered` per finished shot and `WorkerLog` lines go to
the `ProgressReporter` actor (fire and forget), each once (the driver writes every event as
one line of the worker's log); each also goes to the worker's stderr (Ray's per-worker log
file).
"""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any, Callable

from actors.batch_events import ShotRendered, StoryStarted, WorkerLog
from actors.scorer_proxies import ScorerPoolHandles
from actors.story_outcome import Consistency, RunnerStatus, StoryOutcome, WorkerInfo

logger = logging.getLogger("storymem.story_worker")

# Test hook: wraps the loaded pipeline (tests inject a generation failure or a hung shot,
# which real weights cannot be made to do on purpose). Never set in production.
PipelineWrapper = Callable[[Any], Any]


class StoryWorker:
    """Wrap with `ray.remote(...)`; see pipelines/batch/worker_pool.py for the options."""

    def __init__(self, worker_name: str, render, scorer_pools: ScorerPoolHandles | None,
                 progress=None, *, torch_threads: int | None = 1, consistency: bool = False,
                 wrap_pipeline_for_tests: PipelineWrapper | None = None):
        started = time.monotonic()
        self.worker_name = worker_name
        self.progress = progress
        self.consistency = consistency
        self._setup_logging()
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        from storymem_model.model_loading import build_pipeline
        from storymem_model.runner import open_runner

        pipeline = build_pipeline(render.model)
        if wrap_pipeline_for_tests is not None:
            pipeline = wrap_pipeline_for_tests(pipeline)
        self.scorers = None
        if scorer_pools is not None:
            from actors.scorer_proxies import keyframe_scorers_from_pools

            # The scorer actors load their models meanwhile; wait for them only now.
            self.scorers = keyframe_scorers_from_pools(scorer_pools)
        elif render.scorers is not None:
            raise ValueError("a render with memory needs the shared scorer pools")
        self.runner = open_runner(render, pipeline, scorers=self.scorers)
        self.load_s = time.monotonic() - started
        self._log("ready: model %s on %s, config %s, loaded in %.1f s (pid %d)",
                  render.config.model_id, getattr(pipeline, "device", "?"),
                  self.runner.config_hash, self.load_s, os.getpid())

    # ------------------------------------------------------------------------------
    def ping(self) -> WorkerInfo:
        """Who and where this worker is, and the config hash it renders with."""
        return WorkerInfo(worker=self.worker_name, pid=os.getpid(), host=socket.gethostname(),
                          config_hash=self.runner.config_hash, load_s=self.load_s)

    def render_story(self, script, out_uri: str, attempt: int = 1) -> StoryOutcome:
        """Render (or resume) one story; returns its outcome (no frames)."""
        started = time.monotonic()
        self._report(StoryStarted(worker=self.worker_name, pid=os.getpid(),
                                  story_id=script.story_id, attempt=attempt,
                                  shots_total=len(script.shots)))
        try:
            result = self.runner.render(script, out_uri, progress=self._shot_done)
        except Exception as exc:
            self._log("story %s: attempt %d failed: %s: %s\n%s", script.story_id, attempt,
                      type(exc).__name__, exc, traceback.format_exc(), level=logging.ERROR)
            self._events_delivered()
            raise
        consistency = self._consistency(result) if self.consistency else None
        rendered = result.rows[len(result.rows) - result.shots_rendered:] \
            if result.shots_rendered else []
        outcome = StoryOutcome(
            story_id=result.story_id, config_hash=result.config_hash,
            story_uri=result.story_uri, video_uri=result.video_uri,
            status=RunnerStatus(result.status), shots_total=result.shots_total,
            shots_rendered=result.shots_rendered, wall_s=time.monotonic() - started,
            worker=self.worker_name, consistency=consistency,
            shot_seconds=sum(r.shot_seconds for r in rendered),
            denoise_seconds=sum(r.denoise_seconds for r in rendered),
            model_evaluations=sum(r.model_evaluations for r in rendered))
        self._log("story %s: %s (%d shots rendered now) in %.1f s", outcome.story_id,
                  outcome.status, outcome.shots_rendered, outcome.wall_s)
        self._events_delivered()
        return outcome

    # ------------------------------------------------------------------------------
    def _shot_done(self, shot) -> None:
        self._report(ShotRendered(worker=self.worker_name, pid=os.getpid(), shot=shot))

    def _consistency(self, result) -> Consistency:
        """Cross-shot consistency of the committed story
        (`evaluation.story_eval.story_consistency_for_render`) on CLIP frame-average shot
        embeddings, computed through the shared CLIP actors."""
        from storymem_model.evaluation.story_eval import story_consistency_for_render
        from storymem_model.evaluation.video_encoders import ClipFrameAverageEncoder

        if self.scorers is None:
            raise ValueError("consistency needs the CLIP scorer pool (a render with memory)")
        scores = story_consistency_for_render(
            result.story_uri, ClipFrameAverageEncoder(self.scorers.embedder))
        return Consistency(all_pairs=float(scores["consistency_all_pairs"]),
                           top10=float(scores["consistency_top10"]))

    def _report(self, event) -> None:
        """A typed event: its line on stderr, the event to the progress reporter."""
        logger.info("[%s] %s", self.worker_name, event.describe())
        self._event(event)

    def _event(self, event) -> None:
        if self.progress is not None:
            self._last_report = self.progress.report.remote(event)

    def _events_delivered(self, timeout_s: float = 10.0) -> None:
        """Wait until the reporter has this story's events (calls from one caller run in
        order, so the last one done means all are): the driver, which drains them when the
        story's result arrives, then has every line of it. Best effort, bounded."""
        last = getattr(self, "_last_report", None)
        if last is not None:
            import ray

            ray.wait([last], timeout=timeout_s)

    def _log(self, message: str, *args, level: int = logging.INFO) -> None:
        text = message % args if args else message
        logger.log(level, "[%s] %s", self.worker_name, text)
        self._event(WorkerLog(worker=self.worker_name, pid=os.getpid(),
                              level=logging.getLevelName(level), message=text))

    @staticmethod
    def _setup_logging() -> None:
        root = logging.getLogger("storymem")
        if not root.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            root.addHandler(handler)
            root.setLevel(logging.INFO)

