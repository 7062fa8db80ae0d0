"""Who a model is, from its content: ids that survive moving a folder and change with a byte.

The config hash (`render_config.RenderConfig.config_hash`) names every input that can
change a pixel. For weights that is their content, not where they are mounted:

* a model folder's id hashes the files the loader reads, each by its path inside the
  folder and a digest: small files (configs, tokenizers: <= 1 MiB) by their bytes,
  `.safetensors` files by their JSON header (every tensor's name, dtype, shape and offsets)
  and size, other weight files (.pth/.bin/.pt) by their full sha256;
* a LoRA pair's id hashes both files completely (a changed byte is a changed LoRA);
* scorer ids hash their checkpoint files the same way.

Full-file hashes are cached by (absolute path, size, modification time) in
`$STORYMEM_CACHE_DIR/file-digests.json` (default `~/.cache/storymem/`), so they cost one
read per file and machine. Nothing here imports torch or reads tensors: planning a run
reads a few kilobytes per model file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from storymem_model.specs import ModelSpec, ScorerSpec

CACHE_ENV = "STORYMEM_CACHE_DIR"
SMALL_FILE_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER = 100 << 20
ID_CHARS = 16
IGNORED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".lock")
DIFFUSERS_EXPERTS = ("transformer", "transformer_2")
ORIGINAL_EXPERTS = ("high_noise_model", "low_noise_model")
COMPONENT_FOLDERS = ("vae", "text_encoder", "tokenizer", "scheduler")
LORA_STEMS = ("backbone_high_noise", "backbone_low_noise")
LORA_SUFFIXES = (".safetensors", ".pth", ".pt")

# Ids of the tiny preset: built in code from presets.TINY with fixed seeds.
TINY_MODEL_ID = "tiny"
TINY_T2V_MODEL_ID = "tiny:t2v"
TINY_EMBEDDER_ID = "open_clip:storymem-tiny-clip:random-seed0"
TINY_GATE_ID = "aesthetic:tiny-seed1"
# Default gate thresholds: the reference gates with HPSv3 >= 3.0; with the LAION aesthetic
# predictor we use LAION's own "aesthetic 4.5+" cut; the tiny threshold was measured on
# tiny renders (see docs/method.md).
HPS_GATE_THRESHOLD = 3.0
AESTHETIC_GATE_THRESHOLD = 4.5
TINY_GATE_THRESHOLD = 4.0


class IdentityError(ValueError):
    """A model, LoRA or scorer path whose identity cannot be read; names the path."""


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    t2v_model_id: str | None
    lora_id: str | None
    distill_lora_id: str | None = None

    @property
    def has_t2v(self) -> bool:
        return self.t2v_model_id is not None


@dataclass(frozen=True)
class ScorerIdentity:
    embedder_id: str
    gate_id: str
    gate_threshold: float


# ---------------------------------------------------------------------------------------
class _DigestCache:
    """sha256 of whole files, keyed by absolute path, size and mtime, kept in one JSON file."""

    _lock = threading.Lock()

    def __init__(self):
        root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "storymem")
        self.path = os.path.join(root, "file-digests.json")

    def _load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        with self._lock:
            entry = self._load().get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return entry["sha256"]
        digest = _sha256_file(path)
        with self._lock:
            data = self._load()
            data[key] = {"stamp": stamp, "sha256": digest}
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "w", encoding="utf-8") as handle:
                    json.dump(data, handle)
                os.replace(tmp, self.path)
            except OSError:
                pass  # a read-only home: the digest is still right, just not cached
        return digest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(8 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _safetensors_digest(path: Path) -> str:
    """sha256 of a safetensors file's header and size (names, dtypes, shapes, offsets)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise IdentityError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise IdentityError(f"{path}: not a safetensors file (header length {length})")
            header = handle.read(length)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return hashlib.sha256(header + struct.pack("<Q", size)).hexdigest()


def file_digest(path: str | os.PathLike, *, full: bool = False) -> str:
    """A content digest of one file: bytes for small files (or `full`), the header for
    safetensors weights, the cached full sha256 for other weight files."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"{path}: file not found")
    size = path.stat().st_size
    if not full and size > SMALL_FILE_BYTES and path.suffix == ".safetensors":
        return _safetensors_digest(path)
    if size <= SMALL_FILE_BYTES:
        return _sha256_file(path)
    return _DigestCache().digest(path)


def folder_digest(folder: str | os.PathLike) -> str:
    """Digest of every loadable file under `folder` (relative path + file digest)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdentityError(f"{folder}: folder not found")
    digest = hashlib.sha256()
    count = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")) \
                or path.suffix.lower() in IGNORED_SUFFIXES:
            continue
        digest.update(f"{rel}\0{file_digest(path)}\n".encode())
        count += 1
    if count == 0:
        raise IdentityError(f"{folder}: no model files")
    return digest.hexdigest()


def _parts_digest(parts: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for label, folder in parts:
        digest.update(f"{label}\0{folder_digest(folder)}\n".encode())
    return digest.hexdigest()[:ID_CHARS]


def _expert_folders(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        raise IdentityError(f"{folder}: model folder not found")
    for names in (DIFFUSERS_EXPERTS, ORIGINAL_EXPERTS):
        if all((folder / name).is_dir() for name in names):
            return [(f"expert{i}", folder / name) for i, name in enumerate(names)]
    raise IdentityError(f"{folder}: not a Wan2.2 A14B layout (expected "
                        f"{'/ and '.join(DIFFUSERS_EXPERTS)}/ or "
                        f"{'/ and '.join(ORIGINAL_EXPERTS)}/)")


def lora_files(lora_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(high-noise, low-noise) files of a StoryMem LoRA folder."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise IdentityError(f"{folder}: LoRA folder not found")
    found = []
    for stem in LORA_STEMS:
        matches = [folder / f"{stem}{s}" for s in LORA_SUFFIXES if (folder / f"{stem}{s}").is_file()]
        if len(matches) != 1:
            what = "missing" if not matches else f"given twice ({', '.join(m.name for m in matches)})"
            raise IdentityError(f"{folder}: {stem}.* is {what}; a StoryMem LoRA is a pair of "
                                f"{LORA_STEMS[0]}.* and {LORA_STEMS[1]}.* files")
        found.append(matches[0])
    return found[0], found[1]


def distill_lora_files(folder_or_pair) -> tuple[Path, Path]:
    """(high-noise, low-noise) files of a step-distillation LoRA: a folder holding exactly one
    weights file whose name says "high" and one that says "low" (as the Lightning and
    LightX2V releases name them), or a (high, low) pair of files."""
    if isinstance(folder_or_pair, (tuple, list)):
        if len(folder_or_pair) != 2:
            raise IdentityError(f"a distillation LoRA pair is two files (high, low), got "
                                f"{len(folder_or_pair)}")
        files = tuple(Path(p) for p in folder_or_pair)
        for path in files:
            if not path.is_file():
                raise IdentityError(f"{path}: distillation LoRA file not found")
        return files[0], files[1]
    folder = Path(folder_or_pair)
    if not folder.is_dir():
        raise IdentityError(f"{folder}: distillation LoRA folder not found")
    weights = sorted(p for p in folder.iterdir()
                     if p.is_file() and p.suffix in LORA_SUFFIXES and not p.name.startswith("."))
    found = []
    for role in ("high", "low"):
        matches = [p for p in weights if role in p.name.lower()]
        if len(matches) != 1:
            names = [p.name for p in weights] or "no weights files"
            raise IdentityError(
                f"{folder}: expected exactly one {role}-noise file (a name containing "
                f"'{role}') of a distillation LoRA pair, found {len(matches)} among {names}; "
                "a half pair is never loaded")
        found.append(matches[0])
    return found[0], found[1]


def lora_identity(high: str | os.PathLike, low: str | os.PathLike, strength: float = 1.0,
                  kind: str = "storymem-lora") -> str:
    """`storymem-lora:<high>+<low>[@strength]` from the files' full sha256."""
    ids = "+".join(file_digest(p, full=True)[:12] for p in (high, low))
    suffix = "" if float(strength) == 1.0 else f"@{float(strength):g}"
    return f"{kind}:{ids}{suffix}"


def model_identity(spec: ModelSpec) -> ModelIdentity:
    """The content ids of the model a spec names (no weights are loaded)."""
    lora_id = distill_id = None
    if spec.lora_dir is not None:
        lora_id = lora_identity(*lora_files(spec.lora_dir), spec.lora_strength)
    if spec.distill_lora_dir is not None:
        distill_id = lora_identity(*distill_lora_files(spec.distill_lora_dir),
                                   spec.distill_lora_strength, kind="distill-lora")
    if spec.preset == "tiny":
        from storymem_model.presets import TINY

        return ModelIdentity(TINY_MODEL_ID, TINY_T2V_MODEL_ID if TINY.with_t2v else None,
                             lora_id, distill_id)
    folder = Path(spec.model_dir)
    parts = _expert_folders(folder)
    base = Path(spec.components_dir) if spec.components_dir else folder
    for name in COMPONENT_FOLDERS:
        if (base / name).is_dir():
            parts.append((name, base / name))
        elif name != "scheduler":
            raise IdentityError(f"{base}: missing {name}/ (the VAE, text encoder and tokenizer "
                                "come from a diffusers-layout folder)")
    model_id = f"wan2.2-i2v-a14b:{_parts_digest(parts)}"
    t2v_id = None
    if spec.t2v_model_dir is not None:
        t2v_id = f"wan2.2-t2v-a14b:{_parts_digest(_expert_folders(Path(spec.t2v_model_dir)))}"
    return ModelIdentity(model_id, t2v_id, lora_id, distill_id)


def embedder_identity(spec: ScorerSpec) -> str:
    """Content id of the CLIP embedder a scorer spec names."""
    if spec.preset == "tiny":
        return TINY_EMBEDDER_ID
    return f"open_clip:{spec.clip_model}:{file_digest(spec.clip_checkpoint)[:ID_CHARS]}"


def gate_identity(spec: ScorerSpec) -> tuple[str, float]:
    """(content id, threshold) of the quality gate a scorer spec names."""
    problems = spec.problems_for_keyframes()
    if problems:
        raise IdentityError("; ".join(problems))
    if spec.uses_hps:
        base = folder_digest(spec.hps_base_model)[:ID_CHARS]
        gate_id = f"hpsv3:{file_digest(spec.hps_checkpoint)[:ID_CHARS]}:{base}"
        threshold = HPS_GATE_THRESHOLD
    elif spec.preset == "tiny":
        gate_id, threshold = TINY_GATE_ID, TINY_GATE_THRESHOLD
    else:
        head = file_digest(spec.aesthetic_head, full=True)[:ID_CHARS]
        clip = file_digest(spec.aesthetic_clip_checkpoint)[:ID_CHARS]
        gate_id = f"aesthetic:{head}:{spec.aesthetic_clip_model}:{clip}"
        threshold = AESTHETIC_GATE_THRESHOLD
    if spec.gate_threshold is not None:
        threshold = float(spec.gate_threshold)
    return gate_id, float(threshold)


def scorer_identity(spec: ScorerSpec) -> ScorerIdentity:
    """Content ids of the keyframe scorers and the gate threshold they use."""
    return ScorerIdentity(embedder_identity(spec), *gate_identity(spec))
