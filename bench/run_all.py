"""Runs every `bench/bench_*.py` module's `main()` in turn and reports failures at the end.

`make bench` calls this; `python -m bench.run_all NAME...` runs only the named benchmarks
(e.g. `shot keyframes`). Each benchmark writes its results to `bench/results/NAME.json`
(`$STORYMEM_BENCH_RESULTS` to put them elsewhere): the numbers live in those files, not in
the docs.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def available() -> list[str]:
    folder = Path(__file__).resolve().parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(folder)])
                  if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    wanted = list(argv if argv is not None else sys.argv[1:]) or available()
    unknown = sorted(set(wanted) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    failed = []
    results = Path(os.environ.get("STORYMEM_BENCH_RESULTS")
                   or Path(__file__).resolve().parent / "results")
    results.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        print(f"\n=== bench {name} ===", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            module.main(["--json", str(results / f"{name}.json")])
        except Exception:  # report every benchmark, then fail at the end
            traceback.print_exc()
            failed.append(name)
        print(f"=== bench {name}: {time.perf_counter() - start:.1f} s, results in "
              f"{results / f'{name}.json'} ===", flush=True)
    if failed:
        print(f"\nfailed benchmarks: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
