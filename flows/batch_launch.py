"""Start the Ray batch pipeline for a flow: in this process, or as a job on a cluster.

Both run one `pipelines.batch.spec.BatchSpec` (the manifest of pending stories, the
resolved RenderSpec, the BatchOptions and the run id), which the flow has written to
`{out}/runs/{run_id}/flow/batch_spec.json`:

- Local (`ray_address=None`): `pipelines.batch.run_batch(spec)` runs in the flow's process
  on an embedded local Ray (or the Ray this process is already connected to).
- Cluster (`ray_address="http://HEAD:8265"`): `storymem batch --spec URI` is submitted
  through the Ray job API with an idempotent submission id and polled (`flows.ray_job`);
  the spec's `ray_address` is "auto", so the job's driver joins the job's cluster.

Either way the run's tables and `summary.json` land in `{out}/runs/{run_id}/`
(pipelines/run_tables.py); the outcome's summary is read back from there.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from flows import ray_job
from pipelines.batch.spec import BatchSpec
from pipelines import run_tables
from pipelines.run_tables import run_uri
from storymem_model import storage


@dataclass
class BatchOutcome:
    summary: dict
    run_uri: str
    mode: str  # local | cluster
    submission_id: str | None = None
    attached: bool = False


def entrypoint(spec_uri: str) -> str:
    """The Ray job entrypoint: `storymem batch --spec URI`."""
    return "storymem " + shlex.join(["batch", "--spec", spec_uri])


def run_local(spec: BatchSpec, on_event=None) -> BatchOutcome:
    """Run the batch pipeline in this process (embedded local Ray unless connected)."""
    from pipelines.batch import run_batch

    run_batch(spec, on_event=on_event)
    return BatchOutcome(summary=read_summary(spec), run_uri=run_uri(spec.out, spec.run_id),
                        mode="local")


def run_on_cluster(spec: BatchSpec, spec_uri: str, address: str, submission_id: str,
                   runtime_env: dict | None = None, poll_s: float = 10.0,
                   timeout_s: float | None = None, client=None) -> BatchOutcome:
    """Submit `storymem batch --spec spec_uri` as a Ray job (or attach to it) and wait."""
    client = client or ray_job.client_for(address)
    result = ray_job.run_job(
        client, submission_id, entrypoint(spec_uri), runtime_env=runtime_env,
        metadata={"storymem_run_id": spec.run_id, "storymem_out": spec.out},
        poll_s=poll_s, timeout_s=timeout_s)
    return BatchOutcome(summary=read_summary(spec), run_uri=run_uri(spec.out, spec.run_id),
                        mode="cluster", submission_id=submission_id,
                        attached=result.attached)


def read_summary(spec: BatchSpec) -> dict:
    uri = storage.join(run_uri(spec.out, spec.run_id), "summary.json")
    try:
        return run_tables.read_summary(run_uri(spec.out, spec.run_id))
    except FileNotFoundError:
        raise RuntimeError(
            f"the batch run finished but wrote no summary at {uri}; its run folder is "
            f"incomplete (see the job's logs)") from None
