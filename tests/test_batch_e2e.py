"""The Ray batch end to end: tiny preset, local Ray (2 CPUs), moto S3 on 127.0.0.1.

- a clean run of 6 stories with 2 workers to S3: all committed, run tables right, scorer
  requests from different stories really batched;
- a run with faults: one worker killed with `ray.kill`, another worker's process killed
  with SIGKILL, both mid-story; a third story hangs in its second shot until
  `story_timeout_s` kills its worker; one malformed script; one story that fails at
  generation. The 6 stories come out identical to the clean run's, both bad ones end in
  errors.parquet;
- a re-run of the clean batch renders nothing.

The only stand-in is `FailingPipeline`, a wrapper around the real tiny pipeline that raises
on one marked prompt and hangs once on another (a generation failure or a hung GPU cannot
be provoked otherwise); it enters through `run_batch`'s `wrap_pipeline_for_tests` hook.
"""
from __future__ import annotations

import io
import json
import os
import functools
import signal
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest

from actors.batch_events import ShotRendered, StoryRetry
from pipelines.batch import BatchOptions, BatchSpec, ScorerPoolOptions, run_batch
from storymem_model import storage
from storymem_model.records import TIMING_COLUMNS
from storymem_model.story_script import load_script

pytestmark = [pytest.mark.ray, pytest.mark.s3]

FAIL_MARK = "FAIL-GENERATION"
HANG_PROMPT = "a passenger reads by lamplight"  # shot 2 of 03_train.json
STORY_TIMEOUT_S = 20.0


def _stories() -> dict[str, dict]:
    """Six original little stories, 2 or 3 shots, mixed cuts."""
    def story(name, prompts, cuts):
        return {"story_name": name, "story_overview": f"{name}, a test story.",
                "scenes": [{"scene_num": 1, "video_prompts": prompts, "cut": cuts}]}
    return {
        "01_kite.json": story("Red kite", ["a red kite rises over a beach",
                                           "the kite loops in the wind",
                                           "a child reels the kite in"], [True, False, True]),
        "02_fox.json": story("Snow fox", ["a white fox in deep snow",
                                          "the fox pounces on a mouse",
                                          "the fox curls up to sleep"], [True, False, False]),
        "03_train.json": story("Night train", ["a train crosses a bridge at night",
                                               "a passenger reads by lamplight"], [True, True]),
        "04_baker.json": story("The baker", ["a baker kneads dough at dawn",
                                             "bread comes out of the oven"], [True, False]),
        "05_diver.json": story("Pearl diver", ["a diver jumps from a boat",
                                               "she swims past coral"], [True, False]),
        "06_robot.json": story("Garden robot", ["a small robot waters tomatoes",
                                                "the robot rests in the shade"], [True, True]),
    }


def _spec(render, scripts: str, out: str, run_id: str, workers: int = 2, **kw) -> BatchSpec:
    # 16 images per scorer call = two shots' frames: two stories' requests fill one batch.
    scorers = ScorerPoolOptions(max_batch_size=16, max_wait_s=1.5, cpus_per_actor=0.25)
    options = BatchOptions(workers=workers, cpus_per_worker=0.25, scorers=scorers,
                           progress="log", **kw)
    return BatchSpec(scripts=scripts, out=out, render=render, options=options, run_id=run_id)


def _write_scripts(prefix: str, extra: dict | None = None) -> dict[str, str]:
    ids = {}
    for name, story in {**_stories(), **(extra or {})}.items():
        data = story if isinstance(story, (bytes,)) else json.dumps(story).encode()
        storage.write_bytes(storage.join(prefix, name), data)
        if not isinstance(story, bytes):
            ids[name] = load_script(story, name=name).story_id
    return ids


def _read_table(uri: str):
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _story_files(out: str, story_id: str, config_hash: str) -> dict[str, bytes]:
    uri = storage.join(out, story_id, config_hash)
    return {rel: storage.read_bytes(storage.join(uri, rel)) for rel in storage.list_files(uri)}


def _snapshot(out: str) -> dict[str, str]:
    """sha256 of every story file under `out` (run tables excluded)."""
    return {rel: storage.sha256_hex(storage.read_bytes(storage.join(out, rel)))
            for rel in storage.list_files(out) if not rel.startswith("runs/")}


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import boto3

    name = f"batch-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def clean_run(ray_cluster, bucket, small_tiny_render):
    ids = _write_scripts(f"{bucket}/scripts")
    out = f"{bucket}/out"
    summary = run_batch(_spec(small_tiny_render, f"{bucket}/scripts", out, "clean",
                              consistency=True))
    return {"summary": summary, "out": out, "ids": ids}


# ---------------------------------------------------------------------------------------
def test_clean_run_commits_every_story_and_writes_the_run_tables(clean_run, small_tiny_render):
    summary, out, ids = clean_run["summary"], clean_run["out"], clean_run["ids"]
    assert (summary.rendered, summary.skipped, summary.failed) == (6, 0, 0)
    assert summary.status == "completed"
    assert summary.run_uri == f"{out}/runs/clean"
    config_hash = summary.config_hash
    assert config_hash == small_tiny_render.config_hash  # known before any worker started
    shots_total = sum(len(s["scenes"][0]["video_prompts"]) for s in _stories().values())
    assert summary.shots_rendered == shots_total == 14

    for story_id in ids.values():
        uri = storage.join(out, story_id, config_hash)
        assert storage.is_committed(uri) and storage.verify_commit(uri) == []

    stories = _read_table(f"{out}/runs/clean/stories.parquet").to_pylist()
    assert [r["story_id"] for r in stories] == [ids[n] for n in sorted(ids)]
    assert {r["status"] for r in stories} == {"rendered"}
    assert {r["attempts"] for r in stories} == {1}
    assert len({r["worker"] for r in stories}) == 2  # both workers took stories
    for row in stories:
        assert row["story_uri"] == storage.join(out, row["story_id"], config_hash)
        assert storage.exists(row["video_uri"])
        assert -1.0 <= row["consistency_all_pairs"] <= 1.0  # --consistency wired
        assert row["consistency_top10"] >= row["consistency_all_pairs"] - 1e-6

    shots = _read_table(f"{out}/runs/clean/shots.parquet")
    assert shots.num_rows == 14 and set(shots.column("run_id").to_pylist()) == {"clean"}
    per_story = _read_table(storage.join(out, ids["01_kite.json"], config_hash, "shots.parquet"))
    kite_rows = [r for r in shots.to_pylist() if r["story_id"] == ids["01_kite.json"]]
    assert [r["video_sha256"] for r in kite_rows] == per_story.column("video_sha256").to_pylist()
    assert _read_table(f"{out}/runs/clean/errors.parquet").num_rows == 0
    # the cost of each story and shot: evaluations and denoising seconds from the records,
    # GPU-seconds = GPUs per worker (0 here) x the shots' wall time
    shot_rows = shots.to_pylist()
    for row in stories:
        mine = [r for r in shot_rows if r["story_id"] == row["story_id"]]
        assert row["model_evaluations"] == sum(r["model_evaluations"] for r in mine) > 0
        assert row["denoise_seconds"] == pytest.approx(sum(r["denoise_seconds"] for r in mine))
        assert row["gpu_seconds"] == 0.0
    assert summary.model_evaluations_per_shot == pytest.approx(
        sum(r["model_evaluations"] for r in shot_rows) / 14)
    assert summary.denoise_seconds_per_shot > 0 and summary.gpu_seconds_per_shot == 0.0

    saved = json.loads(storage.read_bytes(f"{out}/runs/clean/summary.json"))
    assert saved == summary.to_dict()
    assert saved["rendered"] == 6 and saved["gpu_hours"] == 0.0 and saved["wall_s"] > 0
    assert saved["shots_per_hour"] > 0
    logs = [u.rsplit("/", 1)[1] for u in saved["tables"]["logs"]]
    assert "storymem-clean-worker-0.log" in logs and "storymem-clean-worker-1.log" in logs
    worker_log = storage.read_bytes(f"{out}/runs/clean/logs/storymem-clean-worker-0.log").decode()
    assert "shot_done" in worker_log


def test_scorers_are_shared_and_really_batch_requests_of_different_stories(clean_run):
    scorers = clean_run["summary"].scorers
    embed = scorers["clip"]["methods"]["embed_images"]
    # The tiny gate's head sits on the CLIP pool's own model: like the in-process runner,
    # workers embed each frame once and send the gate only the embeddings.
    assert set(scorers["gate"]["methods"]) == {"score_embeddings"}
    gate = scorers["gate"]["methods"]["score_embeddings"]
    assert embed["requests"] >= 14 and gate["requests"] >= 14  # one per shot at least
    # Requests of the two workers' stories were served together (how often depends on
    # timing; at least once per run with a 1.5 s wait and 16-image batches).
    assert max(embed["max_requests_per_batch"], gate["max_requests_per_batch"]) > 1
    assert embed["batches"] + gate["batches"] < embed["requests"] + gate["requests"]
    # a batch closes once it holds 16 frames; the request that fills it may pass 16
    assert embed["max_items_per_batch"] <= 16 + 9 and gate["max_items_per_batch"] <= 16 + 9
    assert clean_run["summary"].scorer_mean_batch_requests > 1.0


# ---------------------------------------------------------------------------------------
class FailingPipeline:
    """Stand-in around the real tiny pipeline: generation fails for prompts with FAIL_MARK;
    the first generation of HANG_PROMPT (across processes: a marker file) hangs."""

    def __init__(self, inner, hang_marker: str | None = None):
        self._inner = inner
        self._hang_marker = hang_marker

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def generate_shot(self, prompt, *args, **kwargs):
        if FAIL_MARK in prompt:
            raise RuntimeError(f"injected generation failure for prompt {prompt!r}")
        if prompt == HANG_PROMPT and self._hang_marker and not os.path.exists(self._hang_marker):
            with open(self._hang_marker, "w") as handle:
                handle.write(str(os.getpid()))
            time.sleep(600)  # a hung GPU: only --story-timeout gets the story going again
        return self._inner.generate_shot(prompt, *args, **kwargs)


class _Killer:
    """on_event hook: kills the worker rendering a story right after its first shot."""

    def __init__(self, ray, by_ray_kill: str, by_sigkill: str):
        self.ray = ray
        self.plan = {by_ray_kill: "ray.kill", by_sigkill: "SIGKILL"}
        self.done: dict[str, str] = {}
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)
        if not isinstance(event, ShotRendered):
            return
        story = event.story_id
        if story not in self.plan or story in self.done or event.shot.shot_index != 0:
            return
        how = self.plan[story]
        if how == "ray.kill":
            self.ray.kill(self.ray.get_actor(event.worker), no_restart=False)
        else:
            os.kill(event.pid, signal.SIGKILL)
        self.done[story] = event.worker


def test_faults_killed_workers_bad_script_and_failing_story(clean_run, ray_cluster, tmp_path,
                                                           small_tiny_render):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    scripts = str(tmp_path / "scripts")
    extra = {
        "07_malformed.json": b'{"story_name": "Broken", "scenes": [{"video_prompts": []}]}',
        "08_doomed.json": {"story_name": "Doomed", "scenes": [{"video_prompts": [
            "a quiet harbour", f"the harbour at dusk {FAIL_MARK}"], "cut": [True, True]}]},
    }
    ids = _write_scripts(scripts, extra)
    out = str(tmp_path / "out")
    killer = _Killer(ray, by_ray_kill=ids["01_kite.json"], by_sigkill=ids["02_fox.json"])
    hang_marker = str(tmp_path / "hung-once")
    summary = run_batch(_spec(small_tiny_render, scripts, out, "faults", max_attempts=3,
                              story_timeout_s=STORY_TIMEOUT_S),
                        on_event=killer,
                        wrap_pipeline_for_tests=functools.partial(FailingPipeline,
                                                                  hang_marker=hang_marker))

    # both kills happened mid-story (after shot 1 of 3) and were survived
    assert set(killer.done) == {ids["01_kite.json"], ids["02_fox.json"]}
    assert summary.worker_deaths >= 2
    assert summary.worker_replacements == 0  # Ray restarted them; the pool waited for that
    assert (summary.rendered, summary.failed_render, summary.invalid) == (6, 1, 1)
    stories = {r["story_id"]: r for r in
               _read_table(f"{out}/runs/faults/stories.parquet").to_pylist()}
    assert stories[ids["01_kite.json"]]["attempts"] >= 2
    assert stories[ids["02_fox.json"]]["attempts"] >= 2
    assert stories[ids["08_doomed.json"]]["status"] == "failed"
    # the hung story was killed at the timeout and resumed from its committed first shot
    assert os.path.exists(hang_marker)
    train = ids["03_train.json"]
    assert stories[train]["status"] == "rendered" and stories[train]["attempts"] == 2
    timeouts = [e for e in killer.events if isinstance(e, StoryRetry)
                and e.story_id == train]
    assert [e.error_type for e in timeouts] == ["StoryTimeout"]
    assert f"{STORY_TIMEOUT_S:g} s" in timeouts[0].message
    train_shots = [e.shot.shot_index for e in killer.events
                   if isinstance(e, ShotRendered) and e.story_id == train]
    assert train_shots == [0, 1]  # shot 1 rendered once, not again after the kill

    errors = _read_table(f"{out}/runs/faults/errors.parquet").to_pylist()
    by_stage = {e["stage"]: e for e in errors}
    assert len(errors) == 2
    assert by_stage["listing"]["source"].endswith("07_malformed.json")
    assert by_stage["listing"]["error_type"] == "ScriptError"
    assert "07_malformed.json" in by_stage["listing"]["message"]
    assert by_stage["render"]["story_id"] == ids["08_doomed.json"]
    assert by_stage["render"]["attempts"] == 3
    assert "injected generation failure" in by_stage["render"]["message"]
    doomed = storage.join(out, ids["08_doomed.json"], summary.config_hash)
    assert not storage.is_committed(doomed)

    # the 6 good stories are identical to the clean run's (no partial or duplicate files)
    clean_hash = clean_run["summary"].config_hash
    assert summary.config_hash == clean_hash
    for name, story_id in ids.items():
        if name.startswith(("07", "08")):
            continue
        ours = _story_files(out, story_id, clean_hash)
        theirs = _story_files(clean_run["out"], story_id, clean_hash)
        assert sorted(ours) == sorted(theirs), story_id
        drop = [*TIMING_COLUMNS, "video_uri"]
        for rel in ours:
            if rel in ("shots.parquet", "_COMMITTED.json"):
                continue
            if rel.startswith("shots/") and rel.endswith(".json"):  # shot records: timings
                a, b = (json.loads(x[rel]) for x in (ours, theirs))
                assert {k: v for k, v in a.items() if k not in drop} == \
                    {k: v for k, v in b.items() if k not in drop}, f"{story_id}/{rel}"
                continue
            assert ours[rel] == theirs[rel], f"{story_id}/{rel} differs from the clean run"
        a = pq.read_table(io.BytesIO(ours["shots.parquet"])).drop_columns(drop)
        b = pq.read_table(io.BytesIO(theirs["shots.parquet"])).drop_columns(drop)
        assert a.equals(b), story_id


def test_rerun_skips_committed_stories_and_renders_nothing(clean_run, small_tiny_render):
    out = clean_run["out"]
    before = _snapshot(out)
    bucket = out.rsplit("/", 1)[0]
    summary = run_batch(_spec(small_tiny_render, f"{bucket}/scripts", out, "rerun",
                              workers=1))
    assert (summary.rendered, summary.skipped, summary.failed) == (0, 6, 0)
    assert summary.shots_rendered == 0
    assert summary.scorers["clip"]["methods"] == {}  # no scorer call at all
    assert _snapshot(out) == before  # not one story file rewritten
    stories = _read_table(f"{out}/runs/rerun/stories.parquet").to_pylist()
    assert {r["status"] for r in stories} == {"skipped"}
    # the run's shots table still lists every committed shot of the batch
    assert _read_table(f"{out}/runs/rerun/shots.parquet").num_rows == 14


def test_shot_costs_give_gpu_seconds_per_shot_and_story():
    from pipelines.batch.summary import shot_costs
    from pipelines.run_tables import StoryRow

    def row(story, shots, gpu_s, evaluations):
        return StoryRow(run_id="r", position=0, source="s", story_id=story, story_name=story,
                        status="rendered", num_shots=shots, shots_rendered=shots, attempts=1,
                        config_hash="h", story_uri="u", gpu_seconds=gpu_s,
                        denoise_seconds=gpu_s / 2, model_evaluations=evaluations)

    skipped = StoryRow(run_id="r", position=2, source="s", story_id="c", story_name="c",
                       status="skipped", num_shots=3, shots_rendered=0, attempts=1,
                       config_hash="h", story_uri="u")
    costs = shot_costs([row("a", 2, 600.0, 160), row("b", 4, 300.0, 16), skipped])
    assert costs == {"gpu_seconds_per_shot": 150.0, "gpu_seconds_per_story": 450.0,
                     "denoise_seconds_per_shot": 75.0, "model_evaluations_per_shot": 176 / 6}
    assert shot_costs([skipped]) == {}
