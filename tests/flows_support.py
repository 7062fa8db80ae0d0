"""Shared set-up of the flow tests (tests/test_flows_*.py): one Prefect test server and one
nightly render to S3 per pytest process, reused by every flow test module.

Rendering is the expensive part (Ray workers start and load the tiny model), so the first
module that needs the rendered output renders it and later modules reuse it.
"""
from __future__ import annotations

import atexit
import json

import boto3

# The tiny model and scorers at their cheapest settings, as the flows take them.
TINY_FLAGS = ["--preset", "tiny", "--steps", "2", "--height", "32", "--width", "32",
              "--num-frames", "9"]


def tiny_specs() -> dict:
    """The flows' model/scorer/render parameters for the tiny preset (TINY_FLAGS)."""
    from storymem_model.specs import ModelSpec, RenderSettings, SamplingOverrides, ScorerSpec

    return {"model": ModelSpec(preset="tiny"), "scorers": ScorerSpec(preset="tiny"),
            "render": RenderSettings(sampling=SamplingOverrides(num_inference_steps=2),
                                     height=32, width=32, num_frames=9)}


# Three small valid stories (4 shots in all) and one malformed script.
SCRIPTS = {
    "harbour.json": {
        "story_name": "Harbour Morning",
        "story_overview": "A fisherman mends a net at dawn and sails out.",
        "scenes": [{"scene_num": 1, "video_prompts": [
            "An old fisherman in a yellow coat mends a green net on a wooden pier at dawn",
            "The fisherman ties the last knot and looks at the calm sea"],
            "cut": [True, False]}]},
    "orchard.json": {
        "story_name": "Orchard Ladder",
        "story_overview": "A girl picks apples from a tall ladder.",
        "scenes": [{"scene_num": 1, "video_prompts": [
            "A girl in a blue dress climbs a wooden ladder in an apple orchard"],
            "cut": [True]}]},
    "comet.json5": '// a JSON5 script\n["A red comet crosses a starry sky above snowy mountains",]\n',
    "broken.json": {"story_name": "Broken", "scenes": [
        {"scene_num": 1, "video_prompts": ["a shot", ""], "cut": ["True"]}]},
}
VALID_SHOTS = 4

_harness = None
_rendered: dict = {}


def prefect_server():
    """Enter one `prefect_test_harness` (temporary SQLite + server) for the process; the
    `prefect_server` fixture of tests/conftest.py calls `stop_prefect_server` at the end of
    the session."""
    global _harness
    if _harness is None:
        from prefect.testing.utilities import prefect_test_harness

        _harness = prefect_test_harness(server_startup_timeout=180)
        _harness.__enter__()
        atexit.register(stop_prefect_server)
    return _harness


def stop_prefect_server() -> None:
    global _harness
    harness, _harness = _harness, None
    if harness is not None:
        harness.__exit__(None, None, None)


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def new_bucket(endpoint: str, name: str) -> str:
    s3_client(endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_scripts(endpoint: str, bucket_uri: str, prefix: str = "scripts",
                   extra: dict | None = None) -> str:
    """SCRIPTS (and `extra` scripts) under `{bucket_uri}/{prefix}/`; returns that URI."""
    client = s3_client(endpoint)
    bucket = bucket_uri.removeprefix("s3://")
    for name, body in {**SCRIPTS, **(extra or {})}.items():
        data = body if isinstance(body, str) else json.dumps(body)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data.encode())
    return f"{bucket_uri}/{prefix}/"


def nightly_rendered(endpoint: str) -> dict:
    """The first nightly run over SCRIPTS to S3 (rendered once per process)."""
    if not _rendered:
        from flows.nightly_render import nightly_render

        bucket = new_bucket(endpoint, "flows-nightly")
        source = upload_scripts(endpoint, bucket)
        out = f"{bucket}/renders"
        state = nightly_render(source, out, **tiny_specs(), run_id="night-1", retries=2,
                               retry_backoff_s=0.2, lock_ttl_s=60, return_state=True)
        _rendered.update(state=state, source=source, out=out, bucket=bucket)
    return _rendered
