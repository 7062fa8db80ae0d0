"""Story jobs, quotas, session shots and retention of the Serve endpoint, without a
cluster: the bounded job executor, per-key quotas that hold under concurrent requests (local
storage and moto S3), job claims (no job runs twice), adoption with an attempt cap that one
bad job cannot block, a lost claim stopping its job, sanitised job errors, one shot at a
time per session across replicas, and the retention sweep."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.job_executor import JobExecutor
from pipelines.serve.jobs import JobRegistry, JobStatus, StoryJob, new_job_id
from pipelines.serve.limits import LimitExceeded, ServeLimits
from pipelines.serve.usage import UsageIndex
from storymem_model import storage
from storymem_model.leases import Lease

KEY = "a-long-enough-test-key-123456"
SMALL = ["--preset", "tiny", "--no-memory", "--num-frames", "9", "--height", "32",
         "--width", "32", "--steps", "2"]


def _serve_settings(monkeypatch, root, argv=(), flags=SMALL):
    import argparse

    from flows.cli.serve import add_serve_command, settings_from_args

    monkeypatch.setenv("STORYMEM_API_KEYS", KEY)
    parser = argparse.ArgumentParser(prog="storymem")
    add_serve_command(parser.add_subparsers(dest="command"))
    return settings_from_args(parser.parse_args(["serve", *flags, "--storage", str(root),
                                                 *argv]))


def _wait(predicate, timeout_s=120.0, what="condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout_s} s")


# -- the executor -------------------------------------------------------------------------
def test_job_executor_has_its_own_threads_and_a_bounded_queue():
    executor = JobExecutor(workers=1, max_queued=2)
    gate = threading.Event()
    threads = []

    def work():
        threads.append(threading.current_thread().name)
        gate.wait(10)

    executor.reserve("a")
    executor.start("a", work)
    _wait(lambda: executor.counts()["running"] == 1, 10, "job a running")
    executor.reserve("b")
    executor.reserve("c")  # a runs, b and c wait: the queue is full
    with pytest.raises(LimitExceeded) as info:
        executor.reserve("d")
    assert (info.value.status_code, info.value.code, info.value.limit) == (
        429, "job_queue_full", "max_queued_jobs")
    executor.cancel("c")
    executor.reserve("d")  # a cancelled reservation frees its place
    executor.start("b", work)
    executor.start("d", work)
    assert executor.counts() == {"running": 1, "queued": 2}
    gate.set()
    _wait(lambda: executor.counts() == {"running": 0, "queued": 0}, 10, "jobs done")
    assert threads and all(name.startswith("story-job") for name in threads)


# -- quotas under concurrent requests ----------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_per_key_quotas_hold_under_concurrent_requests(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/r"
    limits = ServeLimits(max_active_jobs_per_key=4, max_sessions_per_key=3)
    replicas = [UsageIndex(root, owner=f"replica-{i}") for i in range(3)]  # three replicas

    def admit(i):
        try:
            replicas[i % 3].admit_job("scopeA", f"job-{i:02d}", limits)
            return "ok"
        except LimitExceeded as exc:
            return (exc.status_code, exc.code, exc.limit)

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(admit, range(12)))
    assert results.count("ok") == 4, results
    assert set(results) - {"ok"} == {(429, "quota_exceeded", "max_active_jobs_per_key")}
    usage = replicas[0].read("scopeA")
    assert len(usage.active_jobs) == 4 and replicas[0].scopes() == ["scopeA"]
    replicas[1].end_job("scopeA", sorted(usage.active_jobs)[0], added_bytes=500)
    replicas[2].admit_job("scopeA", "job-late", limits)  # a finished job frees its place

    for i in range(3):
        replicas[i].admit_session("scopeA", f"session-{i}", limits)
    with pytest.raises(LimitExceeded) as info:
        replicas[0].admit_session("scopeA", "session-x", limits)
    assert (info.value.status_code, info.value.limit) == (429, "max_sessions_per_key")
    tight = ServeLimits(max_stored_bytes_per_key=100)
    with pytest.raises(LimitExceeded) as info:
        replicas[0].check_storage("scopeA", tight)
    assert (info.value.status_code, info.value.code, info.value.limit) == (
        429, "quota_exceeded", "max_stored_bytes_per_key")


def test_job_records_read_while_being_rewritten_on_s3(s3_bucket):
    """GET /v1/stories reads job.json while the job's replica rewrites it after every shot.
    A bounded read must get the old or the new record, never fail: reading with open()
    checked the ETag it saw first and failed when the object changed in between (190 of
    300 reads here); storage.read_bytes(max_bytes) now makes one ranged GET."""
    registry = JobRegistry(s3_bucket + "/serve")
    job = registry.create(StoryJob(job_id=new_job_id(), scope="scopeA",
                                   status=JobStatus.RUNNING, story_id="s", config_hash="c",
                                   shots_total=100, seed=0, transition="none"), {})
    stop = threading.Event()

    def progress():
        done = 0
        while not stop.is_set():
            done = (done + 1) % 100
            job.shots_done = done
            registry.save(job)

    writer = threading.Thread(target=progress)
    writer.start()
    try:
        read = [registry.get("scopeA", job.job_id).shots_done for _ in range(150)]
    finally:
        stop.set()
        writer.join()
    assert len(read) == 150 and len(set(read)) > 1  # it really changed while being read


# -- story jobs on a replica --------------------------------------------------------------------
class Replica:
    """What a generation replica holds for story jobs, in this process."""

    def __init__(self, settings, pipe, worker: str, workers: int = 1, on_shot=None,
                 claim_ttl_s: float | None = None):
        from pipelines.serve.job_runner import StoryJobs, job_config
        from pipelines.serve.pipeline_lock import SerializedPipeline
        from pipelines.serve.session_state import PresetConfigs
        from storymem_model.runner import StoryRunner

        self.root = settings.storage_root
        self.registry = JobRegistry(self.root)
        self.usage = UsageIndex(self.root, owner=worker)
        self.executor = JobExecutor(workers, settings.limits.max_queued_jobs)
        pipeline = SerializedPipeline(pipe)
        config = PresetConfigs(settings.render)
        self.jobs = StoryJobs(
            self.registry, self.usage, self.executor, settings.limits, config, worker,
            claim_ttl_s=claim_ttl_s or settings.job_stale_after_s,
            max_attempts=settings.max_job_attempts,
            make_runner=lambda job: StoryRunner(pipeline, None, job_config(config, job)),
            on_shot=on_shot)

    def finished(self, scope, job_id):
        job = self.registry.get(scope, job_id)
        return job if not job.status.active and not self.executor.holds(job_id) else None


def test_story_job_is_claimed_once_and_retired(pipe, monkeypatch, tmp_path):
    from pipelines.serve.schemas import StoryRequest

    settings = _serve_settings(monkeypatch, tmp_path)
    replica = Replica(settings, pipe, "replica-1")
    job = replica.jobs.submit("scopeA", StoryRequest(script=["a boat", "a gull"], seed=2),
                              request_id="req-1")
    done = _wait(lambda: replica.finished("scopeA", job.job_id), what="job finished")
    assert done.status == JobStatus.SUCCEEDED and done.shots_done == 2 and done.attempts == 1
    assert [(c["attempt"], c["worker"]) for c in replica.registry.claims(
        "scopeA", job.job_id)] == [(1, "replica-1")]
    usage = replica.usage.read("scopeA")
    assert usage.active_jobs == {} and usage.stored_bytes > 0
    assert not storage.exists(storage.join(replica.registry.job_uri("scopeA", job.job_id),
                                           "claim.json"))  # released


def test_a_story_job_refused_by_its_quota_leaves_nothing_stored(pipe, monkeypatch, tmp_path):
    """A job over `max_active_jobs_per_key` answers 429 and leaves no folder behind (its
    claim was taken before the quota check: before, its lock guard file stayed until the
    job TTL); the accepted job is untouched."""
    from pipelines.serve.schemas import StoryRequest

    settings = _serve_settings(monkeypatch, tmp_path, ["--limit", "max_active_jobs_per_key=1"])
    replica = Replica(settings, pipe, "replica-q")
    first = replica.jobs.submit("scopeA", StoryRequest(script=["a boat", "a gull"], seed=2))
    with pytest.raises(LimitExceeded) as info:
        replica.jobs.submit("scopeA", StoryRequest(script=["a kite"], seed=3))
    assert (info.value.status_code, info.value.limit) == (429, "max_active_jobs_per_key")
    assert os.listdir(tmp_path / "jobs" / "scopeA") == [first.job_id]
    done = _wait(lambda: replica.finished("scopeA", first.job_id), what="job finished")
    assert done.status == JobStatus.SUCCEEDED


def _dead_replica_job(registry, usage, scope, script, **changes) -> StoryJob:
    """A job as a replica that died while running it leaves it: record running, its claim
    lapsed, still on the key's active jobs."""
    job = StoryJob(job_id=new_job_id(), scope=scope, status=JobStatus.RUNNING,
                   story_id="x", config_hash="x", shots_total=1, seed=0, transition="none",
                   worker="dead-replica", attempts=1, request_id="req-dead")
    for key, value in changes.items():
        setattr(job, key, value)
    registry.create(job, script)
    registry.record_claim(job, "dead-replica")
    storage.write_bytes(storage.join(registry.job_uri(scope, job.job_id), "claim.json"),
                        json.dumps({"owner": "dead-replica", "token": "gone",
                                    "acquired_at": 0, "renewed_at": 0,
                                    "expires_at": time.time() - 1}).encode())
    usage.update(scope, lambda u: u.active_jobs.__setitem__(job.job_id, time.time()))
    return job


def test_adoption_resumes_orphans_caps_attempts_and_skips_bad_jobs(pipe, monkeypatch, tmp_path):
    from pipelines.serve.job_runner import validate_script

    settings = _serve_settings(monkeypatch, tmp_path, ["--max-job-attempts", "3"])
    replica = Replica(settings, pipe, "replica-2")
    registry, usage, scope = replica.registry, replica.usage, "scopeA"
    script = validate_script(["a lighthouse at dusk"], "orphan", settings.limits)
    config = settings.render.config
    good = dict(story_id=script.story_id, config_hash=config.config_hash(),
                seed=config.seed, transition=config.transition)
    # Bad ones first: adopting them must not stop the round before the good one.
    unreadable = _dead_replica_job(registry, usage, scope, script.to_dict(), **good)
    storage.write_bytes(storage.join(registry.job_uri(scope, unreadable.job_id), "job.json"),
                        b"{not json")
    exhausted = _dead_replica_job(registry, usage, scope, script.to_dict(), attempts=3, **good)
    bad_script = _dead_replica_job(registry, usage, scope, {"scenes": "nope"}, **good)
    held = _dead_replica_job(registry, usage, scope, script.to_dict(), **good)
    alive = Lease(storage.join(registry.job_uri(scope, held.job_id), "claim.json"),
                  owner="live-replica", ttl_s=60)
    alive.acquire()  # a live replica holds this one
    orphan = _dead_replica_job(registry, usage, scope, script.to_dict(), **good)
    try:
        assert replica.jobs.adopt() == [orphan.job_id]
        done = _wait(lambda: replica.finished(scope, orphan.job_id), what="orphan finished")
        assert done.status == JobStatus.SUCCEEDED and done.attempts == 2
        assert [(c["attempt"], c["worker"]) for c in registry.claims(scope, orphan.job_id)] \
            == [(1, "dead-replica"), (2, "replica-2")]
        failed = registry.get(scope, exhausted.job_id)
        assert failed.status == JobStatus.FAILED and "max_job_attempts=3" in failed.error
        assert "req-dead" in failed.error
        broken = registry.get(scope, bad_script.job_id)
        assert broken.status == JobStatus.FAILED and "problem" in broken.error
        assert registry.get(scope, held.job_id).status == JobStatus.RUNNING  # untouched
        assert set(usage.read(scope).active_jobs) == {held.job_id}
        assert replica.jobs.adopt() == []  # nothing left to adopt
    finally:
        alive.release()


def test_a_lost_claim_stops_the_job_and_records_nothing_more(pipe, monkeypatch, tmp_path):
    from pipelines.serve.schemas import StoryRequest

    settings = _serve_settings(monkeypatch, tmp_path)
    taken_over = threading.Event()

    def take_over(event):
        # Another replica takes the claim over (this one, say, stalled past its TTL).
        if event.shot_index == 0:
            [job_id] = os.listdir(tmp_path / "jobs" / "scopeA")
            uri = str(tmp_path / "jobs" / "scopeA" / job_id / "claim.json")
            storage.write_bytes(uri, json.dumps({
                "owner": "other-replica", "token": "theirs", "acquired_at": time.time(),
                "renewed_at": time.time(), "expires_at": time.time() + 600}).encode())
            taken_over.set()
            time.sleep(1.0)  # the claim's renewal (every 0.2 s) finds it lost

    replica = Replica(settings, pipe, "replica-3", on_shot=take_over, claim_ttl_s=0.6)
    job = replica.jobs.submit("scopeA", StoryRequest(script=["one", "two", "three"], seed=4))
    _wait(lambda: not replica.executor.holds(job.job_id), what="job stopped")
    assert taken_over.is_set()
    record = replica.registry.get("scopeA", job.job_id)
    assert record.status == JobStatus.RUNNING and record.shots_done <= 1  # never finished here
    lease = json.loads(storage.read_bytes(storage.join(
        replica.registry.job_uri("scopeA", job.job_id), "claim.json")))
    assert lease["owner"] == "other-replica"  # the loser did not remove the winner's claim
    assert job.job_id in replica.usage.read("scopeA").active_jobs  # the new holder retires it


def test_job_failures_reach_clients_sanitised_with_a_request_id(pipe, monkeypatch, tmp_path,
                                                                caplog):
    from pipelines.serve.job_runner import validate_script

    settings = _serve_settings(monkeypatch, tmp_path)
    replica = Replica(settings, pipe, "replica-4")
    script = validate_script(["a fox in the snow"], "fails", settings.limits)
    config = settings.render.config
    job = StoryJob(job_id=new_job_id(), scope="scopeA", status=JobStatus.QUEUED,
                   story_id=script.story_id, config_hash=config.config_hash(), shots_total=1,
                   seed=config.seed, transition=config.transition, attempts=1,
                   request_id="req-secret-path")
    replica.registry.create(job, script.to_dict())
    # A file where the job's output folder goes: the render fails with an OSError naming
    # a server path.
    storage.write_bytes(replica.registry.out_uri(job), b"in the way")
    claim = replica.registry.claim("scopeA", job.job_id, "replica-4", 30)
    assert claim.try_acquire()
    with caplog.at_level(logging.ERROR, logger="storymem.serve.jobs"):
        replica.jobs._run(job, script, claim, threading.Event())
    record = replica.registry.get("scopeA", job.job_id)
    assert record.status == JobStatus.FAILED
    assert "req-secret-path" in record.error
    assert str(tmp_path) not in record.error and "Error" not in record.error
    assert any(str(tmp_path) in r.getMessage() and "req-secret-path" in r.getMessage()
               for r in caplog.records)  # the detail is in the log under the request id


# -- sessions: one shot at a time across replicas -------------------------------------------------
def test_one_shot_at_a_time_per_session_across_replicas(pipe, monkeypatch, tmp_path):
    from pipelines.serve.pipeline_lock import SerializedPipeline
    from pipelines.serve.schemas import SessionCreate, SessionShotRequest
    from pipelines.serve.session_state import (PresetConfigs, create_session,
                                               exclusive_session_shot, open_session)
    from pipelines.serve.sessions import SessionStore

    settings = _serve_settings(monkeypatch, tmp_path)
    store, usage = SessionStore(settings.storage_root), UsageIndex(settings.storage_root, "x")
    model = SerializedPipeline(pipe)
    record = create_session(store, usage, settings.limits, model, None,
                            PresetConfigs(settings.render), "scopeA", SessionCreate(seed=5), [])
    sid = record.session_id
    # Two replicas, each with the session open (or one replica whose cached copy was
    # evicted while a shot ran).
    on_a = open_session(store, model, None, "scopeA", sid)
    on_b = open_session(store, model, None, "scopeA", sid)
    first = SessionShotRequest(prompt="A keeper lights the lamp.", return_video="uri")
    second = SessionShotRequest(prompt="A ship passes the rocks.", return_video="uri")
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("a", exclusive_session_shot(
        store, usage, settings.limits, model, None, on_a, first, "replica-a", 30.0)))
    thread.start()
    _wait(lambda: storage.exists(store.shot_lease_uri("scopeA", sid)), 60, "a's shot lease")
    before = storage.list_files(store.session_uri("scopeA", sid))
    with pytest.raises(ServeRequestError) as info:
        exclusive_session_shot(store, usage, settings.limits, model, None, on_b, second,
                               "replica-b", 30.0)
    assert (info.value.status_code, info.value.code) == (409, "session_busy")
    assert set(storage.list_files(store.session_uri("scopeA", sid))) >= set(before)
    thread.join(120)
    assert [s.prompt for s in store.get("scopeA", sid).shots] == [first.prompt]
    # Once the shot is done, b (stale) reopens from storage and renders the next shot.
    after = exclusive_session_shot(store, usage, settings.limits, model, None, on_b, second,
                               "replica-b", 30.0)
    assert [s.prompt for s in after.record.shots] == [first.prompt, second.prompt]
    assert [(s.scene, s.shot) for s in after.record.shots] == [(1, 1), (1, 2)]
    assert usage.read("scopeA").stored_bytes == after.record.stored_bytes > 0


class _TakenOverWhileGenerating:
    """The tiny pipeline, with another replica taking the session's shot lease over while
    a shot generates - as if this replica stalled past the lease's TTL (its renewal thread
    has not run since, so `lease.lost` is still false)."""

    def __init__(self, pipeline, lease_uri):
        self._pipeline, self.lease_uri, self.taken_over = pipeline, lease_uri, False

    def generate_shot(self, *args, **kwargs):
        frames = self._pipeline.generate_shot(*args, **kwargs)
        now = time.time()
        storage.write_bytes(self.lease_uri, json.dumps({
            "owner": "replica-b", "token": "theirs", "acquired_at": now, "renewed_at": now,
            "expires_at": now + 600}).encode())
        self.taken_over = True
        return frames

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


def test_a_replica_that_lost_the_shot_lease_mid_shot_writes_nothing(pipe, monkeypatch,
                                                                     tmp_path):
    """Replica A's shot lease is taken over while its shot generates: A answers 409
    `session_busy` and writes neither the shot's files nor the session record, so the new
    holder's shot is never overwritten. (Before, A checked only its renewal thread's
    verdict, which a 30 s lease does not give within a shot, and wrote everything.)"""
    from pipelines.serve.pipeline_lock import SerializedPipeline
    from pipelines.serve.schemas import SessionCreate, SessionShotRequest
    from pipelines.serve.session_state import (PresetConfigs, create_session,
                                               exclusive_session_shot, open_session)
    from pipelines.serve.sessions import SessionStore

    settings = _serve_settings(monkeypatch, tmp_path)
    store, usage = SessionStore(settings.storage_root), UsageIndex(settings.storage_root, "x")
    record = create_session(store, usage, settings.limits, SerializedPipeline(pipe), None,
                            PresetConfigs(settings.render), "scopeA", SessionCreate(seed=5), [])
    sid = record.session_id
    folder = store.session_uri("scopeA", sid)
    before = {rel: storage.read_bytes(storage.join(folder, rel))
              for rel in storage.list_files(folder)}
    stalled = _TakenOverWhileGenerating(pipe, store.shot_lease_uri("scopeA", sid))
    live = open_session(store, SerializedPipeline(stalled), None, "scopeA", sid)
    with pytest.raises(ServeRequestError) as info:
        exclusive_session_shot(store, usage, settings.limits, SerializedPipeline(stalled), None,
                               live, SessionShotRequest(prompt="A keeper lights the lamp."),
                               "replica-a", 30.0)
    assert stalled.taken_over
    assert (info.value.status_code, info.value.code) == (409, "session_busy")
    lease = json.loads(storage.read_bytes(store.shot_lease_uri("scopeA", sid)))
    assert lease["owner"] == "replica-b"  # the loser did not release the winner's lease
    after = {rel: storage.read_bytes(storage.join(folder, rel))
             for rel in storage.list_files(folder) if not rel.startswith("shot-lease.json")}
    assert after == before  # no shot file, no memory, the session record unchanged
    assert store.get("scopeA", sid).shots == [] and live.broken


def test_session_shot_limit_holds_for_shots_queued_behind_each_other(pipe, monkeypatch,
                                                                     tmp_path):
    """Two shot requests for a session one shot short of `max_session_shots`, queued on one
    replica behind each other (its session lock): one renders, the other is refused with
    422 and writes nothing. The session's stored bytes, counted from what each request
    wrote (reference, shots, memory checkpoints, record), are its folder's exact size."""
    import numpy as np

    from pipelines.serve.pipeline_lock import SerializedPipeline
    from pipelines.serve.schemas import SessionCreate, SessionShotRequest
    from pipelines.serve.session_state import (PresetConfigs, create_session,
                                               exclusive_session_shot, open_session)
    from pipelines.serve.sessions import SessionStore
    from pipelines.serve.usage import folder_bytes
    from storymem_model.scorers import build_scorers

    memory_on = [flag for flag in SMALL if flag != "--no-memory"]
    settings = _serve_settings(monkeypatch, tmp_path, ["--limit", "max_session_shots=2"],
                               flags=memory_on)
    store, usage = SessionStore(settings.storage_root), UsageIndex(settings.storage_root, "x")
    model, scorers = SerializedPipeline(pipe), build_scorers(settings.render.scorers)
    reference = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    record = create_session(store, usage, settings.limits, model, scorers,
                            PresetConfigs(settings.render), "scopeA", SessionCreate(seed=5),
                            [reference])
    sid = record.session_id
    folder = store.session_uri("scopeA", sid)
    assert record.stored_bytes == folder_bytes(folder) == usage.read("scopeA").stored_bytes
    live = open_session(store, model, scorers, "scopeA", sid)
    session_lock = threading.Lock()

    def shot(prompt):
        with session_lock:
            return exclusive_session_shot(
                store, usage, settings.limits, model, scorers, live,
                SessionShotRequest(prompt=prompt, return_video="uri"), "replica-a", 30.0)

    shot("A keeper lights the lamp.")
    assert store.get("scopeA", sid).stored_bytes == folder_bytes(folder)
    prompts = ["A ship passes the rocks.", "Gulls circle the tower."]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(shot, prompt) for prompt in prompts]
    rendered = [f.result() for f in futures if f.exception() is None]
    refused = [f.exception() for f in futures if f.exception() is not None]
    assert len(rendered) == 1 and len(refused) == 1, refused
    assert isinstance(refused[0], LimitExceeded)
    assert (refused[0].status_code, refused[0].limit, refused[0].got) == (
        422, "max_session_shots", 3)
    stored = store.get("scopeA", sid)
    assert [s.prompt for s in stored.shots] == [
        "A keeper lights the lamp.", rendered[0].shot.prompt]
    assert len(live.story.rows) == 2
    assert stored.stored_bytes == folder_bytes(folder) == usage.read("scopeA").stored_bytes


# -- retention ------------------------------------------------------------------------------
def _age(folder, seconds):
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_retention_sweep_deletes_expired_items_and_recounts_usage(tmp_path):
    from pipelines.serve.retention import RetentionPolicy, RetentionSchedule, sweep
    from pipelines.serve.sessions import SessionStore
    from pipelines.serve.usage import folder_bytes

    root, day = str(tmp_path), 86_400
    registry, sessions = JobRegistry(root), SessionStore(root)
    usage = UsageIndex(root, owner="janitor")

    def put(rel, data=b"x" * 100):
        storage.write_bytes(storage.join(root, rel), data)

    put("shots/s1/old-shot/shots/01_01.mp4")
    put("shots/s1/new-shot/shots/01_01.mp4")
    for sid in ("old-session", "busy-session", "new-session"):
        put(f"sessions/s1/{sid}/session.json", b"{}")
    jobs = {}
    for name, status, finished in (("old-done", JobStatus.SUCCEEDED, time.time() - 10 * day),
                                   ("old-active", JobStatus.RUNNING, time.time() - 10 * day),
                                   ("new-done", JobStatus.FAILED, time.time())):
        job = StoryJob(job_id=new_job_id(), scope="s1", status=status, story_id="s",
                       config_hash="c", shots_total=1, seed=0, transition="none")
        registry.create(job, {"story_name": name})
        job.updated_at = finished
        storage.write_bytes(storage.join(registry.job_uri("s1", job.job_id), "job.json"),
                            job.to_json())
        jobs[name] = job.job_id
    for old in ("shots/s1/old-shot", "sessions/s1/old-session", "sessions/s1/busy-session",
                f"jobs/s1/{jobs['old-done']}", f"jobs/s1/{jobs['old-active']}"):
        _age(os.path.join(root, old), 10 * day)

    def seed_usage(u):
        u.sessions.update({"old-session": 1.0, "busy-session": 1.0, "new-session": 1.0,
                           "ghost": time.time() - 2 * 3600})  # admitted, never written
        u.active_jobs[jobs["old-active"]] = 1.0
        u.stored_bytes = 10**9
    usage.update("s1", seed_usage)
    busy = Lease(sessions.shot_lease_uri("s1", "busy-session"), owner="renderer", ttl_s=60)
    busy.acquire()  # a shot of this session is rendering
    try:
        report = sweep(root, RetentionPolicy(shots_ttl_s=day, sessions_ttl_s=day,
                                             jobs_ttl_s=day), usage, owner="janitor")
        stored = sum(folder_bytes(os.path.join(root, kind, "s1"))
                     for kind in ("shots", "sessions", "jobs"))
    finally:
        busy.release()
    assert report.deleted == {"shots": ["s1/old-shot"], "sessions": ["s1/old-session"],
                              "jobs": [f"s1/{jobs['old-done']}"]}
    assert storage.list_files(os.path.join(root, "shots", "s1")) == [
        "new-shot/shots/01_01.mp4"]
    assert not os.path.exists(os.path.join(root, "sessions", "s1", "old-session"))
    assert registry.get("s1", jobs["old-active"]).status == JobStatus.RUNNING
    record = usage.read("s1")
    assert set(record.sessions) == {"busy-session", "new-session"}
    assert set(record.active_jobs) == {jobs["old-active"]}
    assert record.stored_bytes == stored  # recounted exactly

    # Scheduled: one replica sweeps when due, the others see it done.
    policy = RetentionPolicy(cleanup_every_s=3600)
    first = RetentionSchedule(root, policy, usage, owner="replica-1")
    second = RetentionSchedule(root, policy, usage, owner="replica-2")
    assert first.run_if_due() is not None
    assert second.run_if_due() is None and first.run_if_due() is None
    assert first.run_if_due(now=time.time() + 7200) is not None
