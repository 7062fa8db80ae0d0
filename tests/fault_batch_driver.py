"""`storymem batch` with faults injected at chosen points (the fault run's harness).

    python tests/fault_batch_driver.py batch --scripts ... --out ... --run-id ...

runs the real command (`flows.cli.main`) after hooking the driver's event stream: the
plan in `$STORYMEM_FAULT_DIR/plan.json` lists, per invocation (counted in the same
folder), the faults to cause when the n-th event of a kind is emitted:

    sigkill_worker    SIGKILL the process of the worker that sent the event
    ray_kill_worker   ray.kill(worker) (Ray restarts it)
    sigkill_scorer    SIGKILL the process of the run's first CLIP scorer actor
    kill_driver       SIGKILL this driver process
and, with {"on": "compaction"}, SIGKILL the driver while it compacts the run tables
(after stories.parquet and errors.parquet, before shots.parquet and summary.json).
Every event emitted is appended to `events-{invocation}.jsonl` (kind, story, worker).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import sys
from pathlib import Path


def main() -> int:
    state = Path(os.environ["STORYMEM_FAULT_DIR"])
    counter = state / "invocations"
    invocation = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(invocation + 1))
    plans = json.loads((state / "plan.json").read_text())
    faults = plans[invocation] if invocation < len(plans) else []
    events = open(state / f"events-{invocation}.jsonl", "a", encoding="utf-8")

    def note(record: dict) -> None:
        events.write(json.dumps(record) + "\n")
        events.flush()

    import pipelines.batch.driver as driver
    import pipelines.run_tables as run_tables

    counts: collections.Counter = collections.Counter()
    done: set[int] = set()
    emit = driver.BatchDriver._emit

    def hooked_emit(self, event):
        emit(self, event)
        kind = type(event).__name__
        counts[kind] += 1
        note({"kind": kind, "n": counts[kind], "story_id": getattr(event, "story_id", None),
              "worker": getattr(event, "worker", None)})
        for i, fault in enumerate(faults):
            if i not in done and fault["on"] == kind and fault["n"] == counts[kind]:
                done.add(i)
                cause(fault["do"], event, self)

    def cause(what: str, event, batch) -> None:
        import ray

        note({"fault": what, "story_id": getattr(event, "story_id", None)})
        if what == "sigkill_worker":
            os.kill(event.pid, signal.SIGKILL)
        elif what == "ray_kill_worker":
            ray.kill(ray.get_actor(event.worker), no_restart=False)
        elif what == "sigkill_scorer":
            os.kill(ray.get(batch.scorer_pools.clip[0].info.remote()).pid, signal.SIGKILL)
        elif what == "kill_driver":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            raise ValueError(f"unknown fault {what!r}")

    write_shots = run_tables.write_shots

    def dying_write_shots(*args, **kwargs):
        if any(f["on"] == "compaction" for f in faults):
            note({"fault": "kill_driver", "during": "compaction"})
            os.kill(os.getpid(), signal.SIGKILL)
        return write_shots(*args, **kwargs)

    driver.BatchDriver._emit = hooked_emit
    run_tables.write_shots = dying_write_shots
    from flows.cli import main as storymem

    return storymem(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
