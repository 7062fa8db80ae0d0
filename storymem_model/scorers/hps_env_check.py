"""Checks that the layered HPSv3 environment is what hps-env.mk promises; exits 1 if not.

    .hps-venv/bin/python -m storymem_model.scorers.hps_env_check [MAIN_SITE]

Inside it `transformers` must be 4.45.2 (shadowing the main venv's transformers 5),
`diffusers` 0.36.0, `hpsv3` must import with its model factory, and torch, numpy and ray must
come from the main venv (so the Ray HPS actor can run under this interpreter through
runtime_env `py_executable`). Prints one JSON line with versions and locations.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

EXPECTED = {"transformers": "4.45.2", "diffusers": "0.36.0", "tokenizers": "0.20.3",
            "hpsv3": "1.0.0"}
FROM_MAIN_VENV = ("torch", "numpy", "ray")


def in_hps_environment() -> bool:
    """True when this interpreter is the HPS environment (hpsv3 and its pinned
    transformers importable), so HPSv3 can run in process."""
    import importlib.metadata as metadata

    try:
        return (metadata.version("hpsv3") == EXPECTED["hpsv3"]
                and metadata.version("transformers") == EXPECTED["transformers"])
    except metadata.PackageNotFoundError:
        return False


def check(main_site: str | None = None) -> dict:
    import importlib
    import importlib.metadata as metadata

    problems = []
    report = {"python": sys.executable, "versions": {}, "locations": {}}
    for name, version in EXPECTED.items():
        found = metadata.version(name)
        report["versions"][name] = found
        if found != version:
            problems.append(f"{name} {found} (expected {version})")
    import transformers
    if transformers.__version__ != EXPECTED["transformers"]:
        problems.append(f"import transformers gives {transformers.__version__} "
                        f"from {transformers.__file__}")
    from hpsv3 import HPSv3RewardInferencer  # noqa: F401  (the inference entry point)
    from hpsv3.train import create_model_and_processor  # noqa: F401
    for name in FROM_MAIN_VENV:
        module = importlib.import_module(name)
        report["versions"][name] = getattr(module, "__version__", "?")
        report["locations"][name] = str(Path(module.__file__).parent.parent)
        if main_site and not Path(module.__file__).resolve().is_relative_to(
                Path(main_site).resolve()):
            problems.append(f"{name} imported from {module.__file__}, not the main venv "
                            f"{main_site} (a second copy in the HPS venv?)")
    import storymem_model.scorers.hps_model  # noqa: F401  (our loader imports here)
    report["problems"] = problems
    return report


def main(argv: list[str] | None = None) -> int:
    """MAIN_SITE (optional): the main venv's site-packages; torch, numpy and ray must be
    imported from there."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        print("usage: python -m storymem_model.scorers.hps_env_check [MAIN_SITE]",
              file=sys.stderr)
        return 2
    report = check(argv[0] if argv else None)
    print(json.dumps(report))
    if report["problems"]:
        print("HPS environment check FAILED: " + "; ".join(report["problems"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
