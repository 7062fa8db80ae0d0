"""One log per worker incarnation (and one for the driver), on storage as the run goes.

Every event of the run becomes a line of the log of the worker it concerns
(`BatchEvent.worker_name`; the driver's otherwise): the worker's own log lines, each shot,
attempt and error. Lines reach storage while the run goes - every `flush_s` seconds and
before each story's row is recorded - so a driver that is killed loses at most the last
`flush_s` seconds of them, and never the lines of a story it recorded:

    {run}/logs/parts/{log name}/{invocation}-{segment:04d}.log

Each driver invocation (a run id continued after a kill is a new invocation) writes its
own segments; a segment is rewritten whole at each flush (one atomic write) until it
holds `SEGMENT_BYTES`, then the next one starts, so memory and rewrites stay bounded. At
the end of a run, `compact` joins every invocation's segments of a log, in order, into

    {run}/logs/{log name}.log

with a line `=== invocation ... ===` where each invocation's lines begin. The parts stay.
"""
from __future__ import annotations

import datetime as _dt
import time

from actors.batch_events import BatchEvent, WorkerLog
from pipelines.batch.spec import new_run_id
from storymem_model import storage

DRIVER_LOG = "driver"
LOGS_DIR = "logs"
PARTS_DIR = "parts"
SEGMENT_BYTES = 1024 * 1024  # a segment is closed (and no longer held) past this size
MAX_SEGMENT_READ_BYTES = 4 * SEGMENT_BYTES  # segments are read back with this limit
INVOCATION_MARK = "=== invocation "


class WorkerLogs:
    def __init__(self, run_uri: str, flush_s: float = 10.0, invocation: str | None = None):
        self.run_uri = run_uri
        self.flush_s = flush_s
        # an invocation id has a run id's form: sortable by start time
        self.invocation = invocation or new_run_id()
        self._lines: dict[str, list[str]] = {}  # the open segment of each log
        self._sizes: dict[str, int] = {}
        self._segments: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._last_flush = time.monotonic()

    def write(self, event: BatchEvent) -> None:
        name = event.worker_name or DRIVER_LOG
        level = event.level if isinstance(event, WorkerLog) else "INFO"
        stamp = _dt.datetime.fromtimestamp(event.time).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} {level} {event.describe()}\n"
        self._lines.setdefault(name, []).append(line)
        self._sizes[name] = self._sizes.get(name, 0) + len(line.encode("utf-8"))
        self._dirty.add(name)
        if self._sizes[name] >= SEGMENT_BYTES:
            self._write_segment(name)
            self._lines[name], self._sizes[name] = [], 0
            self._segments[name] = self._segments.get(name, 0) + 1

    def flush(self, force: bool = False) -> None:
        """Write the segments with new lines, at most every `flush_s` unless forced."""
        if not force and time.monotonic() - self._last_flush < self.flush_s:
            return
        for name in sorted(self._dirty):
            self._write_segment(name)
        self._last_flush = time.monotonic()

    def _write_segment(self, name: str) -> None:
        key = f"{self.invocation}-{self._segments.get(name, 0):04d}.log"
        storage.write_bytes(storage.join(self.run_uri, LOGS_DIR, PARTS_DIR, name, key),
                            "".join(self._lines.get(name, [])).encode("utf-8"))
        self._dirty.discard(name)

    def compact(self) -> list[str]:
        """Every log of the run (all invocations) as `{run}/logs/{name}.log`; their URIs."""
        self.flush(force=True)
        parts = storage.join(self.run_uri, LOGS_DIR, PARTS_DIR)
        by_log: dict[str, list[str]] = {}
        for rel in storage.list_files(parts):
            name, _, segment = rel.rpartition("/")
            if name and "/" not in name and segment.endswith(".log"):
                by_log.setdefault(name, []).append(segment)
        uris = []
        for name in sorted(by_log):
            chunks, invocation = [], None
            for segment in sorted(by_log[name]):
                this = segment.rsplit("-", 1)[0]
                if this != invocation:
                    chunks.append(f"{INVOCATION_MARK}{this} ===\n".encode("utf-8"))
                    invocation = this
                chunks.append(storage.read_bytes(storage.join(parts, name, segment),
                                                 max_bytes=MAX_SEGMENT_READ_BYTES))
            uri = storage.join(self.run_uri, LOGS_DIR, f"{name}.log")
            storage.write_bytes(uri, b"".join(chunks))
            uris.append(uri)
        return uris

    def close(self) -> None:
        """Write what is left (also after an error or a lost lock); never raises."""
        try:
            self.flush(force=True)
        except Exception:  # noqa: BLE001 - logs never hide the run's own error
            pass


def invocation_sections(text: str) -> list[str]:
    """A compacted log split by invocation (for readers and tests), oldest first."""
    sections = text.split(INVOCATION_MARK)
    return [s for s in sections if s.strip()]

