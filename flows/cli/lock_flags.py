"""The output-lock flags of the commands that write stories (`storymem render`, `storymem
batch`) and what they do on SIGTERM.

    --wait-lock SECONDS   wait this long for another run holding the output (default 0:
                          exit at once, naming the holder)
    --lock-ttl SECONDS    the lease length; the holder renews it every TTL/3, and a holder
                          that died is taken over after it (at once when it ran on this
                          machine and its process is gone)

The lock itself is `storymem_model.output_lock.OutputLock(out, "render")`.
"""
from __future__ import annotations

import argparse
import contextlib
import signal

from storymem_model.output_lock import DEFAULT_TTL_S


def add_lock_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "output lock", "one writer per output: OUT/_locks/render.json, held while this "
        "command runs")
    group.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                       help="wait this long for another run that holds the output lock; 0: "
                            "exit at once naming the holder")
    group.add_argument("--lock-ttl", type=float, default=DEFAULT_TTL_S, metavar="SECONDS",
                       help="lease of the output lock (renewed every TTL/3 while this runs); "
                            "a holder that died is taken over after it, at once when its "
                            "process ran on this machine")


@contextlib.contextmanager
def sigterm_exits():
    """Within the block SIGTERM (`kill`, a stopped Ray job, a pod shutting down) exits like
    Ctrl-C does, so `finally` blocks run: the output lock is released, Ray actors are
    stopped. The previous handler comes back afterwards."""
    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. a test calling main() from a thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
