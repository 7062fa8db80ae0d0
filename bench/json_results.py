"""The benchmarks' `--json FILE`: their results dict written as JSON."""
from __future__ import annotations

import json


def write_json_results(path: str | None, results: dict, indent: int) -> None:
    """Write `results` to `path`; nothing when no --json path was given."""
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=indent)
