"""Long-lived HPSv3 worker process; runs INSIDE the HPS environment.

    .hps-venv/bin/python -m storymem_model.scorers.hps_worker '<HPSWorkerSpec as JSON>'

Loads the model once, sends a "ready" message, then answers batch requests read from stdin
with replies on stdout in the framing of `hps_protocol` until stdin closes or a "close"
request arrives. Each "score" request is one batched forward pass. A bad request gets an
error reply and the worker keeps serving; only a broken stream ends it. The process's file
descriptor 1 is pointed at stderr, so library prints cannot corrupt the protocol stream.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

from dataclasses import dataclass

from storymem_model.scorers.hps_protocol import ProtocolError, read_message, write_message
from storymem_model.spec_json import Spec


def _protocol_streams():
    """(requests in, replies out); everything else printed to fd 1 then lands on stderr."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return sys.stdin.buffer, replies


def _error_reply(error: BaseException) -> dict:
    return {"ok": False, "error": str(error) or type(error).__name__,
            "error_type": type(error).__name__}


def serve(model, requests, replies) -> int:
    """Answer requests until end of input or "close"; returns the exit code."""
    while True:
        try:
            message = read_message(requests)
        except ProtocolError as error:
            print(f"hps_worker: broken request stream: {error}", file=sys.stderr)
            return 3
        if message is None:
            return 0
        header, array = message
        op = header.get("op")
        if op == "close":
            write_message(replies, {"ok": True, "event": "closed"})
            return 0
        if op == "ping":
            write_message(replies, {"ok": True, "event": "pong"})
            continue
        if op != "score":
            write_message(replies, {"ok": False, "error": f"unknown op {op!r}",
                                    "error_type": "ProtocolError"})
            continue
        if array is None:
            write_message(replies, {"ok": False, "error": "score request without images",
                                    "error_type": "ScorerError"})
            continue
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            scores = model.score(array, header.get("prompts"))
            write_message(replies, {"ok": True, "seconds": time.perf_counter() - start,
                                    "cpu_seconds": time.process_time() - start_cpu}, scores)
        except Exception as error:  # reported to the caller; the worker keeps serving
            traceback.print_exc(file=sys.stderr)
            write_message(replies, _error_reply(error))


@dataclass(frozen=True)
class HPSWorkerSpec(Spec):
    """What the worker loads: its only argument, as JSON (written by HPSScorer)."""

    checkpoint: str
    base_model: str
    device: str = "cpu"
    dtype: str | None = None
    num_threads: int | None = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m storymem_model.scorers.hps_worker '<HPSWorkerSpec JSON>'",
              file=sys.stderr)
        return 2
    args = HPSWorkerSpec.from_json(argv[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    requests, replies = _protocol_streams()
    start = time.perf_counter()
    try:
        import torch
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        from storymem_model.scorers.hps_model import HPSv3Model
        model = HPSv3Model(args.checkpoint, args.base_model, device=args.device,
                           dtype=args.dtype)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        write_message(replies, _error_reply(error))
        return 2
    import transformers
    write_message(replies, {"ok": True, "event": "ready", "load_s": time.perf_counter() - start,
                            "load_cpu_s": time.process_time(),
                            "pid": os.getpid(), "device": model.device, "dtype": model.dtype,
                            "transformers": transformers.__version__})
    return serve(model, requests, replies)


if __name__ == "__main__":
    sys.exit(main())
