"""Start the Ray batch pipeline for a flow: in this process, or as a job on a cluster.

- Local (`ray_address=None`): `pipelines.batch_render.run_batch(...)` runs in the flow's
  process on an embedded local Ray (or the Ray this process is already connected to).
- Cluster (`ray_address="http://HEAD:8265"`): the same run as `storymem batch ...`,
  submitted through the Ray job API with an idempotent submission id and polled
  (`flows.ray_job`). The job's summary is read back from storage.

Either way the run's tables land in `{out}/runs/{run_id}/` (pipelines/run_tables.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
from dataclasses import dataclass, field

from flows import ray_job
from storymem_model import storage


@dataclass
class BatchRequest:
    scripts: str  # a manifest URI (JSONL) or anything `storymem batch --scripts` takes
    out: str
    run_id: str
    model_argv: list[str] = field(default_factory=list)
    workers: int = 1
    gpus_per_worker: float = 0.0
    batch_args: list[str] = field(default_factory=list)  # other `storymem batch` flags

    def cli_argv(self, ray_address: str | None = None) -> list[str]:
        """`storymem batch ...` flags for this run. Inside a Ray job the driver must join
        the job's cluster: `ray_address="auto"` (the batch's default is a private Ray)."""
        argv = ["batch", "--scripts", self.scripts, "--out", self.out,
                "--run-id", self.run_id, "--workers", str(self.workers),
                "--gpus-per-worker", _number(self.gpus_per_worker)]
        if ray_address:
            argv += ["--ray-address", ray_address]
        return argv + list(self.batch_args) + list(self.model_argv)

    def parse(self, ray_address: str | None = None) -> argparse.Namespace:
        """These flags parsed by the `storymem batch` parser itself (BatchArgsError if bad)."""
        return parse_batch_argv(self.cli_argv(ray_address))

    def entrypoint(self) -> str:
        """The Ray job entrypoint: `storymem batch ... --ray-address auto ...`."""
        return "storymem " + shlex.join(self.cli_argv(ray_address="auto"))


class BatchArgsError(ValueError):
    """Flags the `storymem batch` parser rejects; carries its message."""


def parse_batch_argv(argv: list[str]) -> argparse.Namespace:
    from pipelines.cli_batch import add_batch_command

    parser = argparse.ArgumentParser(prog="storymem", exit_on_error=False)
    add_batch_command(parser.add_subparsers(dest="command", required=True))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        message = stderr.getvalue().strip() or str(exc)
        raise BatchArgsError(f"bad batch settings {argv[1:]}: {message}") from None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class BatchOutcome:
    summary: dict
    run_uri: str
    mode: str  # local | cluster
    submission_id: str | None = None
    attached: bool = False


def run_local(request: BatchRequest, on_event=None) -> BatchOutcome:
    """Run the batch pipeline in this process (embedded local Ray unless connected), with
    exactly the flags the cluster job would get (parsed by the `storymem batch` parser)."""
    from pipelines.batch_render import run_batch
    from pipelines.cli_batch import options_from_args

    args = request.parse()
    options = options_from_args(args)
    model_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    summary = run_batch(args.scripts, args.out, model_args, ray_address=args.ray_address,
                        run_id=args.run_id, options=options, on_event=on_event)
    return BatchOutcome(summary=summary, run_uri=run_uri(request), mode="local")


def run_on_cluster(request: BatchRequest, address: str, submission_id: str,
                   runtime_env: dict | None = None, poll_s: float = 10.0,
                   timeout_s: float | None = None, client=None) -> BatchOutcome:
    """Submit `storymem batch` as a Ray job (or attach to it) and wait for it."""
    client = client or ray_job.client_for(address)
    result = ray_job.run_job(
        client, submission_id, request.entrypoint(), runtime_env=runtime_env,
        metadata={"storymem_run_id": request.run_id, "storymem_out": request.out},
        poll_s=poll_s, timeout_s=timeout_s)
    return BatchOutcome(summary=read_summary(request), run_uri=run_uri(request),
                        mode="cluster", submission_id=submission_id,
                        attached=result.attached)


def run_uri(request: BatchRequest) -> str:
    return storage.join(request.out, "runs", request.run_id)


def read_summary(request: BatchRequest) -> dict:
    uri = storage.join(run_uri(request), "summary.json")
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise RuntimeError(
            f"the batch run finished but wrote no summary at {uri}; its run folder is "
            f"incomplete (see the job's logs)") from None
