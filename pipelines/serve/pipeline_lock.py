"""A pipeline wrapper that lets one model serve many requests of one replica in turn.

A generation replica handles several requests at once (single shots, session shots, story
jobs), each in its own thread. diffusers pipelines and schedulers keep per-call state, so
model calls must not overlap: `SerializedPipeline` passes every attribute through and runs
`generate_shot` / `encode_keyframes` under one lock. The lock is taken per call, not per
story, so a long story job and interactive shots interleave shot by shot.
"""
from __future__ import annotations

import threading
import time


class SerializedPipeline:
    def __init__(self, pipeline):
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self.calls = 0
        self.busy_s = 0.0

    def generate_shot(self, *args, **kwargs):
        with self._lock:
            started = time.perf_counter()
            try:
                return self._pipeline.generate_shot(*args, **kwargs)
            finally:
                self.calls += 1
                self.busy_s += time.perf_counter() - started

    def encode_keyframes(self, *args, **kwargs):
        with self._lock:
            return self._pipeline.encode_keyframes(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)
