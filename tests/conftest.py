"""Shared test fixtures: one local Ray cluster, one moto S3 server on 127.0.0.1, one Prefect
test server, the tiny pipeline."""
from __future__ import annotations

import os
import socket
import uuid

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real moto S3 server on 127.0.0.1; storymem reads the endpoint from the env."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "STORYMEM_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["STORYMEM_S3_ENDPOINT_URL"] = endpoint
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket; returns its URI prefix `s3://name`."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """The one local Ray cluster all tests share (2 CPUs, no GPU)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    # Left running until the session ends: ray.shutdown() happens at interpreter exit.


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (temporary SQLite) for the session: the flow tests'
    `pytest.mark.usefixtures("prefect_server")`."""
    import flows_support

    flows_support.prefect_server()
    yield
    flows_support.stop_prefect_server()


@pytest.fixture(scope="module")
def pipe():
    """The tiny-preset pipeline (seeded random weights), built once per test module."""
    import torch

    import storymem_model

    torch.set_num_threads(1)
    return storymem_model.load_pipeline("tiny")


@pytest.fixture(scope="session")
def stbench_dir():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1].parent / "shared" / "stbench"
    if not path.is_dir():
        pytest.fail(f"ST-Bench scripts not found at {path}")
    return path


SMALL_TINY_FLAGS = ["--preset", "tiny", "--num-frames", "9", "--height", "32", "--width", "32",
                    "--steps", "2"]


@pytest.fixture(scope="session")
def small_tiny_render():
    """The RenderSpec of `SMALL_TINY_FLAGS` on a CPU (tiny preset, 9 frames of 32x32,
    2 steps: small shots keep Ray tests fast); resolved without loading weights."""
    from storymem_model.render_spec import resolve_render_spec
    from storymem_model.specs import ModelSpec, RenderSettings, SamplingOverrides, ScorerSpec

    settings = RenderSettings(num_frames=9, height=32, width=32,
                              sampling=SamplingOverrides(num_inference_steps=2))
    return resolve_render_spec(ModelSpec(preset="tiny"), ScorerSpec(preset="tiny"), settings,
                               accelerator=False)
