"""Log set-up shared by the `storymem` commands: INFO and up of the "storymem" loggers to
stderr, with the time."""
from __future__ import annotations

import logging
import sys


def setup_cli_logging() -> None:
    root = logging.getLogger("storymem")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # a root handler set up by a library would print it twice
