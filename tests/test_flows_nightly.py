"""The nightly Prefect flow for real: Prefect test server, the shared local Ray, the tiny
preset, moto S3. One malformed script among four; re-runs; injected transient storage
failures; the output lock; the cluster (Ray job) path."""
from __future__ import annotations

import io
import json
import shlex

import pyarrow.parquet as pq
import pytest

import flows_support as support
from pipelines.batch.spec import BatchSpec
from storymem_model import storage

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def nightly(s3_endpoint, ray_cluster):
    return support.nightly_rendered(s3_endpoint)


def _table(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def _markers(out: str) -> dict[str, bytes]:
    fs, path = storage.filesystem(out)
    fs.invalidate_cache()
    found = fs.glob(f"{path}/*/*/{storage.COMMIT_MARKER}")
    return {p: fs.cat_file(p) for p in sorted(found)}


def test_nightly_commits_three_and_reports_the_malformed_script(nightly):
    state, out = nightly["state"], nightly["out"]
    assert state.is_completed(), state.message
    assert "3 rendered" in state.message and "1 invalid" in state.message
    assert "1 failure(s)" in state.message and "errors.parquet" in state.message
    summary = state.result()
    assert (summary["listed"], summary["rendered"], summary["already_committed"],
            summary["failed"], summary["invalid"], summary["failures"]) == (4, 3, 0, 0, 1, 1)
    assert summary["batch_ran"] and summary["batch_mode"] == "local"

    markers = _markers(out)
    assert len(markers) == 3
    for marker_path in markers:
        assert storage.verify_commit("s3://" + marker_path.rsplit("/", 1)[0]) == []
    stories = _table(summary["stories_uri"])
    assert sorted(r["status"] for r in stories) == ["rendered"] * 3
    assert len(_table(summary["shots_uri"])) == support.VALID_SHOTS
    errors = _table(summary["errors_uri"])
    assert len(errors) == 1 and errors[0]["source"].endswith("broken.json")
    assert errors[0]["stage"] == "listing" and "broken.json" in errors[0]["message"]
    assert summary["errors"][0]["source"].endswith("broken.json")
    # One numbering: every row at its script's place in the source (broken.json first).
    assert sorted((r["position"], r["source"].rsplit("/", 1)[-1]) for r in stories + errors) \
        == list(enumerate(sorted(support.SCRIPTS)))
    # The published summary is the returned one, and the batch left its own summary too.
    published = json.loads(storage.read_bytes(summary["summary_uri"]))
    assert published["message"] == state.message
    assert storage.exists(storage.join(summary["run_uri"], "summary.json"))
    assert storage.read_bytes(storage.join(summary["run_uri"], "flow", "manifest.jsonl")
                              ).count(b"\n") == 3  # only the valid, uncommitted stories
    # The config hash was resolved before the batch, and it is the one the workers used.
    spec = BatchSpec.from_json(storage.read_bytes(
        storage.join(summary["run_uri"], "flow", "batch_spec.json")))
    assert spec.render.config_hash == summary["config_hash"] == \
        summary["batch_summary"]["config_hash"]
    assert {p.split("/")[-2] for p in markers} == {summary["config_hash"]}
    assert spec.ray_address is None and spec.run_id == "night-1"
    assert summary["render_spec"] == spec.render.to_dict()
    assert not storage.exists(storage.join(out, "_locks", "render.json"))  # released


def test_rerun_renders_nothing_new(nightly):
    from flows.nightly_render import nightly_render

    before = _markers(nightly["out"])
    state = nightly_render(nightly["source"], nightly["out"], **support.tiny_specs(),
                           run_id="night-2", retry_backoff_s=0.2, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["rendered"], summary["already_committed"], summary["invalid"]) == (0, 3, 1)
    assert summary["batch_ran"] is False
    assert _markers(nightly["out"]) == before  # nothing rewritten
    stories = _table(summary["stories_uri"])
    assert sorted(r["status"] for r in stories) == ["skipped"] * 3
    errors = _table(summary["errors_uri"])
    assert len(errors) == 1
    assert sorted((r["position"], r["source"].rsplit("/", 1)[-1]) for r in stories + errors) \
        == list(enumerate(sorted(support.SCRIPTS)))  # numbered as the night the batch ran


def test_transient_storage_failure_is_retried_and_the_run_succeeds(nightly, monkeypatch):
    """The first write of the run's summary fails with a connection reset; the publish
    task is retried (backoff) and the run completes."""
    import flows.publish_run as publish_run
    from flows.nightly_render import nightly_render

    real_write = storage.write_bytes
    attempts = []

    def flaky_write(uri, data):
        if uri.endswith("flow_summary.json"):
            attempts.append(uri)
            if len(attempts) == 1:
                raise ConnectionResetError(104, "Connection reset by peer (injected)")
        return real_write(uri, data)

    monkeypatch.setattr(publish_run.storage, "write_bytes", flaky_write)
    state = nightly_render(nightly["source"], nightly["out"], **support.tiny_specs(),
                           run_id="night-flaky", retries=2, retry_backoff_s=0.1,
                           return_state=True)
    assert state.is_completed(), state.message
    assert len(attempts) == 2
    summary = state.result()
    assert json.loads(real_read(summary["summary_uri"]))["run_id"] == "night-flaky"


def real_read(uri):
    return storage.read_bytes(uri)


def test_bad_source_fails_fast_without_retries(nightly, monkeypatch):
    """A wrong source is not transient: one attempt, a failed run naming the URI."""
    import pipelines.story_planner as story_planner
    from flows.nightly_render import nightly_render

    calls = []
    real_list = story_planner.list_scripts

    def counting_list(uri, exclude=None):
        calls.append(uri)
        return real_list(uri, exclude=exclude)

    monkeypatch.setattr(story_planner, "list_scripts", counting_list)
    missing = nightly["bucket"] + "/no-such-prefix/"
    state = nightly_render(missing, nightly["out"], **support.tiny_specs(), retries=3,
                           retry_backoff_s=0.1, return_state=True)
    assert state.is_failed()
    assert "no-such-prefix" in state.message and "no such file" in state.message
    assert len(calls) == 1
    assert not storage.exists(storage.join(nightly["out"], "_locks", "render.json"))


def test_bad_model_setting_fails_before_any_work(nightly):
    from flows.nightly_render import nightly_render

    specs = support.tiny_specs()
    state = nightly_render(nightly["source"], nightly["out"], model=specs["model"],
                           scorers=specs["scorers"], render={"transition": "sideways"},
                           run_id="night-sideways", return_state=True)
    assert state.is_failed() and "sideways" in state.message
    state = nightly_render(nightly["source"], nightly["out"],
                           model={"model_dir": nightly["bucket"] + "/no-such-model"},
                           render={"memory": False}, run_id="night-no-model",
                           return_state=True)
    assert state.is_failed() and "no-such-model" in state.message
    for run_id in ("night-sideways", "night-no-model"):
        assert not storage.exists(storage.join(nightly["out"], "runs", run_id))


def test_second_run_on_a_locked_output_is_refused(nightly):
    from flows.nightly_render import nightly_render
    from storymem_model.output_lock import OutputLock

    with OutputLock(nightly["out"], owner="the other nightly run", ttl_s=60):
        state = nightly_render(nightly["source"], nightly["out"], **support.tiny_specs(),
                               run_id="night-blocked", return_state=True)
    assert state.is_failed()
    assert "locked" in state.message and "the other nightly run" in state.message
    assert not storage.exists(storage.join(nightly["out"], "runs", "night-blocked"))


class FakeJobClient:
    """A fake of Ray's JobSubmissionClient (the shared test cluster has no dashboard, so no
    job server): `submit_job` runs the entrypoint - the real `storymem batch` command -
    in this process on the shared local Ray. The first status poll raises a connection
    error once, like a job server that drops a request."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.submissions: list[str] = []
        self.polls = 0

    def get_job_status(self, submission_id):
        if submission_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {submission_id} "
                               "does not exist.")
        return self.jobs[submission_id]["status"]

    def submit_job(self, *, entrypoint, submission_id, **kwargs):
        from flows.cli import main

        assert submission_id not in self.jobs, "submitted twice with one id"
        self.submissions.append(submission_id)
        argv = shlex.split(entrypoint)
        assert argv[0] == "storymem"
        self.jobs[submission_id] = {"entrypoint": entrypoint, "status": "RUNNING"}
        rc = main(argv[1:])
        self.jobs[submission_id]["status"] = "SUCCEEDED" if rc in (0, 1) else "FAILED"
        return submission_id

    def get_job_info(self, submission_id):
        self.polls += 1
        if self.polls == 1:
            raise ConnectionError("Failed to connect to Ray at address: http://head:8265.")

        class Info:
            status = self.jobs[submission_id]["status"]
            message = "fake job done"
        return Info()

    def get_job_logs(self, submission_id):
        return ""


NEW_STORY = {"lighthouse.json": {"story_name": "Lighthouse Keeper", "scenes": [
    {"scene_num": 1, "video_prompts": ["A keeper lights the lamp of a lighthouse at dusk"],
     "cut": [True]}]}}


class LockCheckingJobClient(FakeJobClient):
    """The fake job server, noting who holds the output lock when the job starts and after
    it ended: the flow hands its lease over, the job's driver takes it by its token."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.lock_at_start = self.lock_at_end = None
        self.token = None

    def submit_job(self, *, entrypoint, submission_id, **kwargs):
        from storymem_model.output_lock import read_lock

        spec = BatchSpec.from_json(storage.read_bytes(shlex.split(entrypoint)[-1]))
        self.token = spec.lock_token
        self.lock_at_start = read_lock(self.out)
        result = super().submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                    **kwargs)
        self.lock_at_end = read_lock(self.out)
        return result


def test_cluster_path_submits_the_batch_spec_as_one_ray_job_and_attaches_on_retry(
        nightly, s3_endpoint, monkeypatch):
    """On a cluster the flow resolves the config hash too: of the nightly scripts plus one
    new story, only the new one goes to the Ray job, whose entrypoint is `storymem batch
    --spec` on the BatchSpec the flow wrote."""
    from flows import ray_job
    from flows.nightly_render import nightly_render

    source = support.upload_scripts(s3_endpoint, nightly["bucket"], "scripts-cluster",
                                    extra=NEW_STORY)
    fake = LockCheckingJobClient(nightly["out"])
    monkeypatch.setattr(ray_job, "client_for", lambda address: fake)
    state = nightly_render(source, nightly["out"], **support.tiny_specs(),
                           run_id="night-cluster", ray_address="http://head:8265",
                           retries=2, retry_backoff_s=0.1, job_poll_s=0.05,
                           return_state=True)
    assert state.is_completed(), state.message
    # One submission although the task ran twice (the poll failed once, then attached).
    assert len(fake.submissions) == 1 and fake.polls >= 2
    submission_id = fake.submissions[0]
    assert submission_id.startswith("storymem-nightly-") and "night-cluster" in submission_id
    summary = state.result()
    spec_uri = storage.join(summary["run_uri"], "flow", "batch_spec.json")
    assert fake.jobs[submission_id]["entrypoint"] == f"storymem batch --spec {spec_uri}"
    spec = BatchSpec.from_json(storage.read_bytes(spec_uri))
    assert spec.ray_address == "auto" and spec.run_id == "night-cluster"
    assert spec.scripts == storage.join(summary["run_uri"], "flow", "manifest.jsonl")
    assert storage.read_bytes(spec.scripts).count(b"\n") == 1  # only the new story
    assert spec.render.config_hash == summary["config_hash"] == \
        nightly["state"].result()["config_hash"]
    assert summary["ray_submission_id"] == submission_id and summary["batch_mode"] == "cluster"
    assert (summary["rendered"], summary["already_committed"], summary["invalid"]) == (1, 3, 1)
    assert (summary["batch_summary"]["rendered"], summary["batch_summary"]["skipped"]) == (1, 0)
    assert len(_markers(nightly["out"])) == 4
    # the flow handed its output lock to the job: the job's driver took it by its token
    # and released it when it ended; nobody holds it after the flow
    assert fake.token and fake.lock_at_start["token"] == fake.token
    assert fake.lock_at_start["owner"].startswith("storymem-nightly-render run night-cluster")
    assert fake.lock_at_end is None
    assert not storage.exists(storage.join(nightly["out"], "_locks", "render.json"))


def test_submission_ids_are_stable_and_safe():
    from flows.ray_job import submission_id_for

    a = submission_id_for("nightly", "s3://b/out", "night 1/x")
    assert a == submission_id_for("nightly", "s3://b/out/", "night 1/x")
    assert a != submission_id_for("nightly", "s3://b/other", "night 1/x")
    assert a != submission_id_for("nightly", "s3://b/out", "night 1/x", attempt=2)
    assert all(c.isalnum() or c in "-_" for c in a)


def test_a_deeply_nested_script_is_an_invalid_row_and_the_night_goes_on(nightly, s3_endpoint):
    """A 286-byte script nested 143 levels deep (json5 used to recurse out on it) among
    the nightly scripts: one more invalid row, the run completes."""
    from flows.nightly_render import nightly_render

    source = support.upload_scripts(s3_endpoint, nightly["bucket"], "scripts-nested",
                                    extra={"nested.json": "[" * 143 + "]" * 143})
    state = nightly_render(source, nightly["out"], **support.tiny_specs(),
                           run_id="night-nested", retry_backoff_s=0.2, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["already_committed"], summary["invalid"]) == (3, 2)
    errors = {e["source"].rsplit("/", 1)[1]: e for e in _table(summary["errors_uri"])}
    assert sorted(errors) == ["broken.json", "nested.json"]
    assert errors["nested.json"]["error_type"] == "ScriptError"
    assert "nested 143 levels deep, more than the limit of 32" in errors["nested.json"]["message"]


def test_a_bad_run_id_fails_the_flow_before_anything_is_written(nightly):
    from flows.nightly_render import nightly_render

    for bad in ("night 1", "night/1", "-night"):
        state = nightly_render(nightly["source"], nightly["out"], **support.tiny_specs(),
                               run_id=bad, return_state=True)
        assert state.is_failed() and "run_id" in state.message and repr(bad) in state.message
        assert not storage.exists(storage.join(nightly["out"], "runs", bad.split("/")[0]))
