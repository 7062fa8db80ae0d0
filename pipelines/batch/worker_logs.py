"""One log file per worker incarnation (and one for the driver), uploaded with the run.

Every event of the run becomes a line of the log of the worker it concerns
(`BatchEvent.worker_name`; the driver's otherwise): the worker's own log lines, each shot,
attempt and error. Lines go to local files while the run goes and are uploaded to
`{run}/logs/{worker}.log` at the end, also for workers that died.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile

from actors.batch_events import BatchEvent, WorkerLog
from storymem_model import storage

DRIVER_LOG = "driver"


class WorkerLogs:
    def __init__(self, run_id: str):
        self.folder = tempfile.mkdtemp(prefix=f"storymem-batch-{run_id}-")

    def write(self, event: BatchEvent) -> None:
        name = event.worker_name or DRIVER_LOG
        level = event.level if isinstance(event, WorkerLog) else "INFO"
        stamp = _dt.datetime.fromtimestamp(event.time).strftime("%Y-%m-%d %H:%M:%S")
        with open(os.path.join(self.folder, f"{name}.log"), "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {level} {event.describe()}\n")

    def upload(self, run_uri: str) -> list[str]:
        uris = []
        for name in sorted(os.listdir(self.folder)):
            uri = storage.join(run_uri, "logs", name)
            with open(os.path.join(self.folder, name), "rb") as handle:
                storage.write_bytes(uri, handle.read())
            uris.append(uri)
        return uris

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
