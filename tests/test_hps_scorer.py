"""HPSv3 scorer: the real hpsv3 code on a tiny random Qwen2-VL, in the layered HPS env.

Needs `.hps-venv` (`make hps-env`; `make test` builds it). Run alone with `pytest -m hps`.
One worker process serves most tests (loading hpsv3 takes seconds); the worker-death test
comes last because it kills that worker.
"""
from __future__ import annotations

import io
import os
import signal
import stat
import sys

import numpy as np
import pytest

from storymem_model.scorers import ImageScorer, ScorerError
from storymem_model.scorers.hps_protocol import (ProtocolError, encode_message,
                                                 read_message)
from storymem_model.scorers.hps_scorer import (DEFAULT_HPS_VENV, HPS_PYTHON_ENV, HPSScorer,
                                               HPSWorkerError, build_tiny_hps, hps_python)

pytestmark = pytest.mark.hps


def _images(seed: int, count: int, size: int = 48) -> np.ndarray:
    """Smooth coloured gradients with a dark block: distinct, image-like frames."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    frames = []
    for _ in range(count):
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        mix = (ramp[:, None] * rng.uniform() + ramp[None, :] * rng.uniform())[..., None] / 2
        frame = low * (1 - mix) + high * mix
        frame[rng.integers(0, size // 2):, rng.integers(0, size // 2):] *= rng.uniform(0.2, 0.9)
        frames.append(frame.clip(0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="module")
def hps_env() -> str:
    python = DEFAULT_HPS_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"HPS environment missing at {python}: run `make hps-env` first")
    return str(python)


@pytest.fixture(scope="module")
def tiny_hps(hps_env, tmp_path_factory) -> dict:
    return build_tiny_hps(tmp_path_factory.mktemp("tiny-hps"), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny_hps):
    with HPSScorer(tiny_hps["checkpoint_path"], tiny_hps["base_model_path"],
                   num_threads=1) as hps:
        yield hps


def test_scores_real_images_through_the_worker_with_hpsv3(scorer, tiny_hps):
    assert isinstance(scorer, ImageScorer) and scorer.name == "hpsv3:hpsv3.safetensors"
    assert scorer.default_threshold == 3.0
    assert scorer.info["transformers"] == "4.45.2"  # the pinned stack, not the main venv's
    assert scorer.info["pid"] != os.getpid()
    frames = _images(1, 5)
    scores = scorer.score_images(frames)
    assert scores.shape == (5,) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    # The model looks at the pixels: different frames, different scores.
    assert np.ptp(scores) > 1e-3
    # Deterministic: same frames, same scores; a list of frames works like an array.
    np.testing.assert_array_equal(scorer.score_images(list(frames)), scores)
    # Tiny scores are calibrated around the reference gate 3.0 so a 3.0 gate passes some.
    many = scorer.score_images(_images(2, 12))
    assert (many >= 3.0).any() and (many < 3.0).any()


def test_batch_equals_one_by_one_and_chunked(scorer):
    frames = _images(3, 6)
    prompts = ["", "a lighthouse at dusk", "", "two friends in the rain, close-up", "x", ""]
    batched = scorer.score_images(frames, prompts)
    single = np.concatenate([scorer.score_images(frames[i:i + 1], prompts[i:i + 1])
                             for i in range(len(frames))])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)
    saved = scorer.max_batch_size
    scorer.max_batch_size = 4  # 6 images -> requests of 4 and 2
    try:
        np.testing.assert_allclose(scorer.score_images(frames, prompts), batched,
                                   rtol=1e-4, atol=1e-4)
    finally:
        scorer.max_batch_size = saved
    # Prompts are really used (docs/method.md#keyframes scores with the empty prompt by default).
    empty = scorer.score_images(frames)
    assert not np.allclose(empty[[1, 3]], batched[[1, 3]])
    np.testing.assert_allclose(empty[[0, 2, 5]], batched[[0, 2, 5]], rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused_clearly_and_the_worker_keeps_serving(scorer):
    frames = _images(4, 2)
    with pytest.raises(ScorerError, match="uint8"):
        scorer.score_images(frames.astype(np.float32))
    with pytest.raises(ScorerError, match=r"\(N, H, W, 3\)"):
        scorer.score_images(frames[..., :2])
    with pytest.raises(ScorerError, match="2 prompts for 3 images"):
        scorer.score_images(_images(5, 3), ["a", "b"])
    with pytest.raises(ScorerError, match="empty batch"):
        scorer.score_images([])
    # Bypassing the caller-side checks: the worker validates too and answers with an error.
    with pytest.raises(ScorerError, match="uint8"):
        scorer._request({"op": "score", "prompts": None}, frames.astype(np.int64))
    with pytest.raises(HPSWorkerError, match="unknown op"):
        scorer._request({"op": "explode"})
    assert scorer.alive and scorer.ping()
    assert scorer.score_images(frames).shape == (2,)


def test_missing_environment_names_the_make_target(tmp_path, monkeypatch, tiny_hps):
    with pytest.raises(ScorerError, match="make hps-env"):
        HPSScorer(tiny_hps["checkpoint_path"], tiny_hps["base_model_path"],
                  python=tmp_path / "no-venv" / "bin" / "python")
    monkeypatch.setenv(HPS_PYTHON_ENV, str(tmp_path / "elsewhere" / "python"))
    with pytest.raises(ScorerError, match="make hps-env"):
        hps_python()


def test_wrong_checkpoint_or_base_paths_are_named(tmp_path, tiny_hps, hps_env):
    missing = tmp_path / "HPSv3.safetensors"
    with pytest.raises(ScorerError, match="HPSv3 checkpoint not found: .*HPSv3.safetensors"):
        HPSScorer(missing, tiny_hps["base_model_path"])
    with pytest.raises(ScorerError, match="Qwen2-VL base model folder"):
        HPSScorer(tiny_hps["checkpoint_path"], tmp_path)
    # A file that exists but is no checkpoint: the worker fails to load and says why.
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(HPSWorkerError, match="loading HPSv3") as error:
        HPSScorer(corrupt, tiny_hps["base_model_path"], num_threads=1)
    assert "Last worker stderr lines" in str(error.value)


def test_worker_that_dies_at_start_is_reported_with_its_stderr(tmp_path, tiny_hps):
    # A stand-in interpreter (not the HPS env): it writes to stderr and exits at once.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'worker cannot start: out of memory' >&2\nexit 7\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(HPSWorkerError, match=r"exited with code 7(.|\n)*out of memory"):
        HPSScorer(tiny_hps["checkpoint_path"], tiny_hps["base_model_path"], python=fake)


def test_protocol_framing_round_trip_and_truncation():
    images = _images(6, 3, size=8)
    stream = io.BytesIO(encode_message({"op": "score", "prompts": ["a", "", "b"]}, images)
                        + encode_message({"op": "ping"}))
    header, array = read_message(stream)
    assert header == {"op": "score", "prompts": ["a", "", "b"]}
    np.testing.assert_array_equal(array, images)
    assert read_message(stream) == ({"op": "ping"}, None)
    assert read_message(stream) is None
    truncated = encode_message({"op": "score"}, images)[:-10]
    with pytest.raises(ProtocolError, match="stream ended"):
        read_message(io.BytesIO(truncated))


@pytest.mark.ray
def test_ray_runs_code_under_the_hps_interpreter(ray_cluster, hps_env):
    """The Ray HPS actors use runtime_env py_executable: ray and hpsv3 both import there."""
    ray = ray_cluster

    @ray.remote(num_cpus=0.25, runtime_env={"py_executable": hps_env})
    def versions():
        import sys

        import hpsv3  # noqa: F401
        import ray as worker_ray
        import torch
        import transformers
        return (sys.executable, transformers.__version__, worker_ray.__version__,
                torch.__file__)

    executable, transformers_version, ray_version, torch_file = ray.get(
        versions.remote(), timeout=300)
    assert executable == hps_env and transformers_version == "4.45.2"
    assert ray_version == ray.__version__ and sys.executable != hps_env
    # Layered, not a second torch: the HPS interpreter imports the main venv's torch.
    import torch
    assert torch_file == torch.__file__


def test_worker_death_mid_session_is_reported(scorer):
    """Last test of the module: kills the shared worker."""
    scorer.score_images(_images(7, 1))
    os.kill(scorer._process.pid, signal.SIGKILL)
    with pytest.raises(HPSWorkerError, match=r"exited with code -9"):
        scorer.score_images(_images(7, 2))
    assert not scorer.alive
    scorer.close()
    with pytest.raises(HPSWorkerError, match="closed"):
        scorer.score_images(_images(7, 1))
