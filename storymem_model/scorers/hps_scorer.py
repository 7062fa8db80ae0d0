"""`HPSScorer`: the HPSv3 `ImageScorer` of the main environment, backed by a worker process.

HPSv3 needs transformers 4.45.2, so the model lives in a separate interpreter (the layered
`.hps-venv` built by `make hps-env`). `HPSScorer` starts
`<hps python> -m storymem_model.scorers.hps_worker` once, waits until the model is loaded,
and then sends each `score_images` call as one (or a few, see `max_batch_size`) batched
requests over the worker's stdin/stdout (`hps_protocol`). Use it as a context manager or call
`close()`.

    with HPSScorer("ckpt/HPSv3.safetensors", "ckpt/Qwen2-VL-7B-Instruct", device="cuda") as hps:
        scores = hps.score_images(frames)          # (N,) float32, empty prompts

`max_batch_size` (default 8) bounds one forward pass: without flash-attn, transformers
4.45's Qwen2-VL vision tower attends over one masked (P, P) matrix spanning every patch in
the batch (1024 patches per image at HPSv3's pixel budget), so its cost and memory grow with
the square of the batch; 8 keeps that below the language model's share on a GPU.

`HPSScorer.tiny(folder)` builds (once) and loads the tiny random HPSv3 of `hps_tiny`.
Errors: `ScorerError` for bad input, a missing environment (names `make hps-env`) or a
missing checkpoint/base folder; `HPSWorkerError` when the worker dies or times out.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from storymem_model.scorers import HPS_GATE_THRESHOLD
from storymem_model.scorers.base import ScorerError, check_image_batch, check_prompts
from storymem_model.scorers.hps_model import check_model_paths
from storymem_model.scorers.hps_protocol import ProtocolError, encode_message, read_message

log = logging.getLogger(__name__)

HPS_PYTHON_ENV = "STORYMEM_HPS_PYTHON"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding storymem_model/
DEFAULT_HPS_VENV = _PACKAGE_ROOT / ".hps-venv"
_STDERR_LINES = 40


class HPSWorkerError(RuntimeError):
    """The HPS worker process failed: it died, timed out, or broke the protocol."""


def hps_python(python: str | os.PathLike | None = None) -> Path:
    """The HPS environment's interpreter: `python`, else $STORYMEM_HPS_PYTHON, else
    `<repo>/.hps-venv/bin/python`. Raises ScorerError naming `make hps-env` if missing."""
    chosen = python or os.environ.get(HPS_PYTHON_ENV) or DEFAULT_HPS_VENV / "bin" / "python"
    path = Path(chosen)
    if not path.exists():
        raise ScorerError(
            f"HPSv3 environment not found: {path} does not exist. Build it with `make hps-env` "
            f"(in {_PACKAGE_ROOT}), or point {HPS_PYTHON_ENV} at an interpreter that has "
            "hpsv3 1.0.0 and transformers 4.45.2")
    return path


def _worker_env(num_threads: int | None) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    # The worker imports the same storymem_model code as this process.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class _DeadlineReader:
    """`read(n)` on a pipe that raises TimeoutError once `deadline` (monotonic) passes."""

    def __init__(self, fd: int, deadline: float | None):
        self.fd, self.deadline = fd, deadline

    def read(self, count: int) -> bytes:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(remaining, 0.0))
            if not ready:
                raise TimeoutError
        return os.read(self.fd, min(count, 1 << 24))


DEFAULT_HPS_ROWS = 8  # one HPSv3 forward; without flash-attn memory grows with it


def score_in_fixed_batches(score, images: np.ndarray, prompts: list[str],
                           size: int = DEFAULT_HPS_ROWS) -> np.ndarray:
    """`score(images, prompts)` in forwards of exactly `size` images (black frames with
    empty prompts pad the last one), so a frame's score never depends on its batch mates."""
    from storymem_model.scorers.fixed_batch import run_fixed

    pairs = list(zip(images, prompts))
    filler = (np.zeros_like(images[0]), "") if len(images) else None
    out = run_fixed(lambda rows: score(np.stack([i for i, _ in rows]), [p for _, p in rows]),
                    pairs, size, filler)
    return np.asarray(out, dtype=np.float32)


class HPSScorer:
    """HPSv3 preference score per image (higher is better), computed in the HPS environment.

    `name` is "hpsv3:<checkpoint file name>"; `default_threshold` is the reference's
    keyframe gate, 3.0.
    """

    name = "hpsv3"
    default_threshold = HPS_GATE_THRESHOLD

    def __init__(self, checkpoint_path: str | os.PathLike, base_model_path: str | os.PathLike,
                 *, device: str = "cpu", dtype: str | None = None,
                 python: str | os.PathLike | None = None, max_batch_size: int = DEFAULT_HPS_ROWS,
                 num_threads: int | None = None, startup_timeout_s: float = 900.0,
                 request_timeout_s: float = 900.0):
        if max_batch_size < 1:
            raise ScorerError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.python = hps_python(python)
        checkpoint, base = check_model_paths(checkpoint_path, base_model_path)
        self.checkpoint_path, self.base_model_path = str(checkpoint), str(base)
        # Goes into the render config hash; the same form as the Ray HPS actors' gate name.
        self.name = f"hpsv3:{checkpoint.name}"
        self.device, self.max_batch_size = device, max_batch_size
        self.request_timeout_s = request_timeout_s
        # Counters for benchmarks: requests answered, wall and CPU seconds inside the model.
        self.requests_total = 0
        self.worker_seconds_total = self.worker_cpu_seconds_total = 0.0
        self._lock = threading.Lock()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        from storymem_model.scorers.hps_worker import HPSWorkerSpec

        spec = HPSWorkerSpec(checkpoint=self.checkpoint_path, base_model=self.base_model_path,
                             device=device, dtype=dtype, num_threads=num_threads)
        command = [str(self.python), "-m", "storymem_model.scorers.hps_worker", spec.to_json()]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_worker_env(num_threads), bufsize=0)
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name="hps-worker-stderr", daemon=True)
        self._stderr_thread.start()
        try:
            header, _ = self._receive(startup_timeout_s, "loading the model")
        except BaseException:
            self._kill()
            raise
        if not header.get("ok"):
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            self._stderr_thread.join(timeout=5)  # so the error shows the whole traceback
            self._raise_reply(header, "loading HPSv3")
        self.info = header
        log.info("HPSv3 worker %s ready in %.1f s", header.get("pid"), header.get("load_s", 0))

    # -- the ImageScorer protocol ------------------------------------------------------
    def score_images(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N,) float32; prompts default to "" (as the reference)."""
        batch = check_image_batch(images)
        texts = check_prompts(prompts, len(batch))
        return score_in_fixed_batches(self._score_chunk, batch, texts, self.max_batch_size)

    def _score_chunk(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        header, scores = self._request({"op": "score", "prompts": prompts}, images)
        if scores is None or scores.shape != (len(images),):
            raise HPSWorkerError(f"HPS worker returned {None if scores is None else scores.shape} "
                                 f"scores for {len(images)} images")
        return scores

    def ping(self) -> bool:
        header, _ = self._request({"op": "ping"})
        return header.get("event") == "pong"

    # -- process handling --------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _request(self, header: dict, array: np.ndarray | None = None):
        with self._lock:
            if self._process is None:
                raise HPSWorkerError("HPSScorer is closed")
            if self._process.poll() is not None:
                raise self._died("before the request")
            try:
                self._process.stdin.write(encode_message(header, array))
                self._process.stdin.flush()
            except (BrokenPipeError, ConnectionResetError, ValueError):
                raise self._died("while receiving a request") from None
            reply, result = self._receive(self.request_timeout_s, f"answering {header['op']!r}")
            self.requests_total += 1
            self.worker_seconds_total += float(reply.get("seconds", 0.0))
            self.worker_cpu_seconds_total += float(reply.get("cpu_seconds", 0.0))
        if not reply.get("ok"):
            self._raise_reply(reply, f"HPS {header['op']}")
        return reply, result

    def _receive(self, timeout_s: float | None, doing: str):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        reader = _DeadlineReader(self._process.stdout.fileno(), deadline)
        try:
            message = read_message(reader)
        except TimeoutError:
            self._kill()
            raise HPSWorkerError(f"HPS worker took longer than {timeout_s} s {doing}; "
                                 f"killed it. {self._stderr_text()}") from None
        except ProtocolError as error:
            raise self._died(f"{doing} ({error})") from None
        if message is None:
            raise self._died(doing)
        return message

    def _died(self, doing: str) -> HPSWorkerError:
        try:
            code = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self._process.returncode
        self._stderr_thread.join(timeout=5)
        return HPSWorkerError(f"HPS worker (pid {self._process.pid}) exited with code {code} "
                              f"{doing}. {self._stderr_text()}")

    def _raise_reply(self, reply: dict, doing: str):
        message = f"{doing}: {reply.get('error', 'unknown error')}"
        if reply.get("error_type") == "ScorerError":
            raise ScorerError(message)
        raise HPSWorkerError(f"{message} ({reply.get('error_type')}). {self._stderr_text()}")

    def _drain_stderr(self) -> None:
        for raw in iter(self._process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            log.debug("hps_worker: %s", line)

    def _stderr_text(self) -> str:
        lines = [line for line in self._stderr_tail if line.strip()]
        if not lines:
            return "The worker wrote nothing to stderr."
        return "Last worker stderr lines:\n" + "\n".join(lines[-15:])

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=30)

    def close(self) -> None:
        """Stop the worker (asks politely, then kills after 10 s). Safe to call twice."""
        process = self._process
        if process is None:
            return
        with self._lock:
            if process.poll() is None:
                try:
                    process.stdin.write(encode_message({"op": "close"}))
                    process.stdin.flush()
                    process.stdin.close()
                    process.wait(timeout=10)
                except (BrokenPipeError, OSError, ValueError, subprocess.TimeoutExpired):
                    self._kill()
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self._process = None

    def __enter__(self) -> "HPSScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if getattr(self, "_process", None) is not None:
                self._kill()
        except Exception:
            pass

    # -- tiny ------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, folder: str | os.PathLike, seed: int = 0, **kwargs) -> "HPSScorer":
        """The tiny random HPSv3 (built into `folder` once, in the HPS env), loaded."""
        manifest = build_tiny_hps(folder, seed=seed, python=kwargs.get("python"))
        return cls(manifest["checkpoint_path"], manifest["base_model_path"], **kwargs)


def build_tiny_hps(folder: str | os.PathLike, seed: int = 0,
                   python: str | os.PathLike | None = None, timeout_s: float = 600) -> dict:
    """Run `hps_tiny` in the HPS environment unless `folder` already holds that seed's build.

    Returns the manifest (checkpoint_path, base_model_path, seed, sizes).
    """
    from storymem_model.scorers.hps_tiny import MANIFEST

    manifest_path = Path(folder) / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("seed") == seed:
            return manifest
    interpreter = hps_python(python)
    result = subprocess.run(
        [str(interpreter), "-m", "storymem_model.scorers.hps_tiny", str(folder),
         str(int(seed))], capture_output=True, text=True, timeout=timeout_s,
        env=_worker_env(num_threads=1))
    if result.returncode != 0:
        raise HPSWorkerError(f"building the tiny HPSv3 in {folder} failed (exit "
                             f"{result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(manifest_path.read_text())
