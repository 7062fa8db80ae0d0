"""`training_card.json`: what a LoRA pair was trained from and how.

The card names the prepared data (its manifest's sha256 and counts), the base model (its
content id and spec), the fit spec, the steps and samples each expert saw, the LoRA files
with their sha256 (what `--lora-dir` will load, hence the render's `lora_id` together with
the strength), the final and best losses, the measured throughput, the resumes, the
validation numbers, the software versions and the parallelism used.
"""
from __future__ import annotations

import platform
import time

from storymem_model import storage
from storymem_model.training.lora import EXPERT_FILES
from storymem_model.training.specs import FitSpec

CARD_FORMAT = 1


def _versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "peft", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are project dependencies
            versions[package] = None
    return versions


def _summary(rows: list[dict], expert: str) -> dict:
    mine = [r for r in rows if r["expert"] == expert]
    if not mine:
        return {}
    head = mine[: max(1, min(10, len(mine) // 5 or 1))]
    tail = mine[-max(1, min(10, len(mine) // 5 or 1)):]
    rates = [r["samples_per_s"] for r in mine]
    return {"steps": mine[-1]["step"], "samples_seen": mine[-1]["samples_seen"],
            "first_loss": mine[0]["loss"], "final_loss": mine[-1]["loss"],
            "mean_loss_first_steps": sum(r["loss"] for r in head) / len(head),
            "mean_loss_last_steps": sum(r["loss"] for r in tail) / len(tail),
            "min_loss": min(r["loss"] for r in mine),
            "median_samples_per_s": sorted(rates)[len(rates) // 2],
            "peak_memory_gib_per_worker": max(r.get("peak_memory_gib") or 0.0 for r in mine)}


def training_card(spec: FitSpec, *, manifest: dict, manifest_sha256: str, lora_dir: str,
                  experts: dict[str, str], state: dict, metrics: list[dict], validation: list[dict],
                  run_name: str, seconds: float) -> dict:
    """The card (a JSON-able dict). `experts`: per expert "trained" (this fit), "kept" (a file
    already in the folder) or "zero" (a zero LoRA, no change)."""
    from storymem_model.model_identity import model_identity

    files = {}
    for expert, name in EXPERT_FILES.items():
        data = storage.read_bytes(storage.join(lora_dir, name))
        files[name] = {"expert": expert, "sha256": storage.sha256_hex(data), "bytes": len(data),
                       "origin": experts.get(expert, "kept")}
    return {
        "format": CARD_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "what": "StoryMem M2V LoRA pair (released key format, rsLoRA)",
        "base_model": {"model_id": model_identity(spec.model).model_id, "spec": spec.model.to_dict()},
        "data": {"uri": spec.data, "manifest_sha256": manifest_sha256, "counts": manifest.get("counts", {}),
                 "geometry": manifest.get("geometry", {}), "clips_source": manifest.get("clips_source"),
                 "prepared_fingerprint": manifest.get("fingerprint")},
        "lora": {"rank": spec.rank, "alpha": spec.alpha, "use_rslora": True,
                 "scale": spec.alpha / spec.rank ** 0.5,
                 "saved_with_alpha_equal_rank": True,
                 "targets": "self_attn.{q,k,v,o}, cross_attn.{q,k,v,o}, ffn.{0,2} of every block"},
        "lora_files": files,
        "steps": {e: v["steps"] for e, v in state.get("completed", {}).items() if e in spec.experts},
        "experts": {e: _summary(metrics, e) for e in spec.experts},
        "base_weights": {e: {**v, "unchanged": v.get("sha256_before") == v.get("sha256_after")}
                         for e, v in state.get("base_weights", {}).items() if e in spec.experts},
        "resumes": state.get("resumes", []),
        "validation": validation,
        "parallelism": {"mode": spec.parallel, "workers": spec.workers,
                        "backend": "nccl" if spec.gpus_per_worker > 0 else "gloo",
                        "gpus_per_worker": spec.gpus_per_worker},
        "config": spec.to_dict(),
        "ray_train_run": run_name,
        "seconds": round(seconds, 3),
        "versions": _versions(),
    }
