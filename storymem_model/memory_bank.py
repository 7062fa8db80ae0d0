"""The memory bank: keyframes of a story that condition the next shot (StoryMem's M2V).

Every keyframe stored in the story is kept (lossless image, provenance, CLIP embedding,
gate score, VAE latents cached per resolution); the *memory* handed to the model is a view
over them chosen by the policy of docs/method.md#memory-policy:

- the first `sink` entries of the story always stay (the "memory sink"; MR2V reference
  images, which enter first, fill it before any keyframe does);
- the rest is a sliding window of the newest entries, at most `max_size` frames in all;
- `max_size == sink` freezes the memory to the sink; `sink > max_size` is refused.

Optional, beyond the paper (off by default): prompt-aware memory, which fills the window
with the stored keyframes most similar (CLIP text-image) to the next shot's prompt.

`save(uri)` / `MemoryBank.load(uri)` go through fsspec (local folders, s3://): PNG images,
safetensors embeddings and latents, and a JSON manifest written last.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storymem_model import storage

DEFAULT_MAX_SIZE = 10  # the model was trained with up to 10 memory frames
DEFAULT_SINK = 3
MANIFEST = "manifest.json"
FORMAT = "storymem.memory_bank"
VERSION = 1
KINDS = ("keyframe", "reference")

EncodeFn = Callable[[np.ndarray, int, int], torch.Tensor]


class MemoryBankError(ValueError):
    """A memory bank operation that cannot be done (names the entry, file or setting)."""


@dataclass
class KeyframeEntry:
    """One stored frame: the lossless image, where it came from and its cached numbers."""

    keyframe_id: str
    image: np.ndarray                       # (H, W, 3) uint8
    story_id: str
    scene: int                              # 1-based; 0 for reference images
    shot: int                               # 1-based within the scene; 0 for references
    frame_index: int                        # frame of the saved shot (reference: its order)
    prompt: str = ""
    clip_embedding: np.ndarray | None = None  # (D,) float32, L2-normalised
    aesthetic_score: float | None = None      # the gate's score
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # "HxW" -> (16, 1, h, w)
    kind: str = "keyframe"                  # "keyframe" or "reference" (MR2V)

    @staticmethod
    def make_id(scene: int, shot: int, frame_index: int) -> str:
        return f"scene{scene:03d}-shot{shot:03d}-frame{frame_index:04d}"

    @classmethod
    def from_shot(cls, frames: np.ndarray, indices: Iterable[int], *, story_id: str,
                  scene: int, shot: int, prompt: str = "", embeddings=None,
                  scores=None) -> list["KeyframeEntry"]:
        """Entries for the selected frames of one shot, with their cached numbers."""
        entries = []
        for index in indices:
            index = int(index)
            if not 0 <= index < len(frames):
                raise MemoryBankError(f"frame index {index} outside the shot's {len(frames)} "
                                      f"frames (scene {scene}, shot {shot})")
            entries.append(cls(
                keyframe_id=cls.make_id(scene, shot, index),
                image=np.array(frames[index], dtype=np.uint8, copy=True),
                story_id=story_id, scene=scene, shot=shot, frame_index=index, prompt=prompt,
                clip_embedding=None if embeddings is None
                else np.array(embeddings[index], dtype=np.float32, copy=True),
                aesthetic_score=None if scores is None else float(scores[index])))
        return entries


def memory_indices(count: int, max_size: int, sink: int) -> list[int]:
    """Positions (in story order) of the stored entries that form the memory."""
    if count <= max_size:
        return list(range(count))
    window = max_size - sink
    recent = list(range(count - window, count)) if window > 0 else []
    return list(range(sink)) + recent


class MemoryBank:
    """All stored keyframes of one story and the memory view over them."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE, sink: int = DEFAULT_SINK):
        if not isinstance(max_size, int) or max_size < 1:
            raise MemoryBankError(f"max_size must be an integer >= 1, got {max_size!r}")
        if not isinstance(sink, int) or sink < 0:
            raise MemoryBankError(f"sink must be an integer >= 0, got {sink!r}")
        if sink > max_size:
            raise MemoryBankError(f"sink ({sink}) larger than max_size ({max_size}): the "
                                  "memory could not even hold its sink")
        self.max_size = max_size
        self.sink = sink
        self._stored: list[KeyframeEntry] = []
        self._ids: set[str] = set()
        self._written_images: dict[str, set[str]] = {}

    # ---- contents -------------------------------------------------------------------
    @property
    def stored(self) -> list[KeyframeEntry]:
        """Every entry stored in the story, in order (references first)."""
        return list(self._stored)

    @property
    def entries(self) -> list[KeyframeEntry]:
        """The current memory: sink + sliding window, in story order."""
        return [self._stored[i] for i in memory_indices(len(self._stored), self.max_size,
                                                         self.sink)]

    def add(self, entries: Iterable[KeyframeEntry]) -> list[KeyframeEntry]:
        """Store new entries (all checked before any is stored); returns them."""
        new = list(entries)
        ids = set()
        dim = self._embedding_dim()
        for entry in new:
            _check_entry(entry)
            if entry.keyframe_id in self._ids or entry.keyframe_id in ids:
                raise MemoryBankError(f"keyframe {entry.keyframe_id!r} is already stored")
            ids.add(entry.keyframe_id)
            if entry.clip_embedding is not None:
                if dim is not None and entry.clip_embedding.shape[0] != dim:
                    raise MemoryBankError(
                        f"keyframe {entry.keyframe_id!r}: embedding dimension "
                        f"{entry.clip_embedding.shape[0]}, the bank holds {dim}")
                dim = entry.clip_embedding.shape[0]
        seen_keyframe = any(e.kind == "keyframe" for e in self._stored)
        for entry in new:
            if entry.kind == "reference" and seen_keyframe:
                raise MemoryBankError(f"reference image {entry.keyframe_id!r} after a keyframe: "
                                      "MR2V references must enter before any keyframe")
            seen_keyframe = seen_keyframe or entry.kind == "keyframe"
        self._stored.extend(new)
        self._ids.update(ids)
        return new

    def add_references(self, images: Sequence[np.ndarray], *, story_id: str,
                       embedder=None, prompt: str = "") -> list[KeyframeEntry]:
        """MR2V: reference images become the initial memory (they fill the sink first)."""
        images = [np.asarray(image) for image in images]
        if not images:
            return []
        embeddings = None
        if embedder is not None:
            embeddings = [embedder.embed_images(image[None])[0] for image in images]
        start = sum(1 for e in self._stored if e.kind == "reference")
        entries = [KeyframeEntry(
            keyframe_id=f"reference{start + i:03d}", image=np.array(image, copy=True),
            story_id=story_id, scene=0, shot=0, frame_index=start + i, prompt=prompt,
            clip_embedding=None if embeddings is None else np.asarray(embeddings[i],
                                                                      dtype=np.float32),
            kind="reference") for i, image in enumerate(images)]
        return self.add(entries)

    def images(self, entries: Sequence[KeyframeEntry] | None = None) -> list[np.ndarray]:
        """Images of the memory (or of `entries`), each (H, W, 3) uint8."""
        return [e.image for e in (self.entries if entries is None else entries)]

    def embeddings(self, entries: Sequence[KeyframeEntry] | None = None) -> np.ndarray:
        """(M, D) float32 CLIP embeddings of the memory (or of `entries`)."""
        chosen = self.entries if entries is None else list(entries)
        return self._stack_embeddings(chosen)

    def stored_embeddings(self, include_references: bool = False) -> np.ndarray:
        """Embeddings of every stored keyframe: what new keyframes must not duplicate.

        The reference compares a new keyframe with every keyframe saved earlier in the
        story (not only the current memory window) and not with MR2V reference images.
        """
        chosen = [e for e in self._stored if include_references or e.kind == "keyframe"]
        return self._stack_embeddings(chosen)

    def latents(self, encode_fn: EncodeFn, height: int, width: int,
                entries: Sequence[KeyframeEntry] | None = None) -> torch.Tensor:
        """(M, 16, 1, h, w) VAE latents of the memory at this resolution.

        Each entry is encoded once per resolution: `encode_fn(images (K, H, W, 3) uint8,
        height, width) -> (K, 16, 1, h, w)` (e.g. `pipeline.encode_keyframes`) is called
        only for entries without a cached latent for "HxW", batched by image size.
        """
        chosen = self.entries if entries is None else list(entries)
        if not chosen:
            raise MemoryBankError("no memory entries to encode")
        key = f"{int(height)}x{int(width)}"
        missing: dict[tuple, list[KeyframeEntry]] = {}
        for entry in chosen:
            if key not in entry.latents:
                missing.setdefault(entry.image.shape, []).append(entry)
        for group in missing.values():
            encoded = encode_fn(np.stack([e.image for e in group]), height, width)
            if not isinstance(encoded, torch.Tensor) or encoded.ndim != 5 \
                    or encoded.shape[0] != len(group):
                shape = tuple(encoded.shape) if isinstance(encoded, torch.Tensor) else encoded
                raise MemoryBankError(
                    f"encode_fn returned {shape} for {len(group)} keyframes; expected a "
                    f"tensor ({len(group)}, C, 1, h, w)")
            for entry, latent in zip(group, encoded):
                entry.latents[key] = latent.detach().clone()
        device = chosen[0].latents[key].device
        return torch.stack([e.latents[key].to(device) for e in chosen])

    def memory_for_shot(self, prompt: str | None = None, embedder=None,
                        prompt_aware: bool = False) -> list[KeyframeEntry]:
        """The entries to condition the next shot on: the policy's memory by default,
        or (prompt_aware=True) the sink plus the keyframes most similar to `prompt`."""
        if not prompt_aware:
            return self.entries
        if embedder is None or prompt is None:
            raise MemoryBankError("prompt-aware memory needs the next shot's prompt and a "
                                  "CLIP embedder")
        return self.select_for_prompt(embedder.embed_texts([prompt])[0])

    def select_for_prompt(self, text_embedding) -> list[KeyframeEntry]:
        """Prompt-aware memory (off by default): the sink stays; the window holds the
        stored entries with the highest cosine similarity to `text_embedding` (ties go
        to the newer entry). Returned in story order."""
        count = len(self._stored)
        if count <= self.max_size:
            return self.stored
        text = np.asarray(text_embedding, dtype=np.float64).reshape(-1)
        candidates = self._stored[self.sink:]
        vectors = self._stack_embeddings(candidates).astype(np.float64)
        if vectors.shape[1] != text.shape[0]:
            raise MemoryBankError(f"text embedding has dimension {text.shape[0]}, keyframe "
                                  f"embeddings {vectors.shape[1]}")
        norm = np.linalg.norm(text)
        if not np.isfinite(norm) or norm == 0:
            raise MemoryBankError("text embedding is zero or not finite")
        similarity = vectors @ (text / norm) / np.linalg.norm(vectors, axis=1)
        order = sorted(range(len(candidates)), key=lambda i: (-similarity[i], -i))
        keep = sorted(order[:self.max_size - self.sink])
        return self._stored[:self.sink] + [candidates[i] for i in keep]

    # ---- storage --------------------------------------------------------------------
    def save(self, uri: str) -> None:
        """Write the bank under `uri`; the manifest goes last, so a bank without a manifest
        was never completely written. Images already written to `uri` are not rewritten."""
        for entry in self._stored:  # entries may have been changed after add()
            _check_entry(entry)
        written = self._written_images.setdefault(uri, set())
        entries_meta = []
        for entry in self._stored:
            image_key = f"images/{entry.keyframe_id}.png"
            png = None
            if entry.keyframe_id not in written:
                png = _encode_png(entry.image)
                storage.write_bytes(storage.join(uri, image_key), png)
            entries_meta.append({
                "keyframe_id": entry.keyframe_id, "kind": entry.kind,
                "story_id": entry.story_id, "scene": entry.scene, "shot": entry.shot,
                "frame_index": entry.frame_index, "prompt": entry.prompt,
                "aesthetic_score": entry.aesthetic_score,
                "image": image_key, "image_shape": list(entry.image.shape),
                "image_sha256": hashlib.sha256(np.ascontiguousarray(entry.image)).hexdigest(),
                "has_embedding": entry.clip_embedding is not None,
                "latents": sorted(entry.latents),
            })
        embeddings = {e.keyframe_id: torch.from_numpy(np.ascontiguousarray(e.clip_embedding))
                      for e in self._stored if e.clip_embedding is not None}
        if embeddings:
            storage.write_bytes(storage.join(uri, "embeddings.safetensors"),
                                save_safetensors(embeddings))
        resolutions = sorted({key for e in self._stored for key in e.latents})
        for key in resolutions:
            tensors = {e.keyframe_id: e.latents[key].detach().cpu().contiguous()
                       for e in self._stored if key in e.latents}
            storage.write_bytes(storage.join(uri, "latents", f"{key}.safetensors"),
                                save_safetensors(tensors))
        manifest = {"format": FORMAT, "version": VERSION, "max_size": self.max_size,
                    "sink": self.sink, "entries": entries_meta,
                    "memory": [e.keyframe_id for e in self.entries],
                    "latent_resolutions": resolutions}
        storage.write_bytes(storage.join(uri, MANIFEST),
                            json.dumps(manifest, indent=1, sort_keys=True).encode())
        written.update(e.keyframe_id for e in self._stored)

    @classmethod
    def load(cls, uri: str) -> "MemoryBank":
        """Read a bank written by `save`; every file is checked against the manifest."""
        try:
            raw = storage.read_bytes(storage.join(uri, MANIFEST))
        except FileNotFoundError:
            raise MemoryBankError(f"no memory bank at {uri}: {MANIFEST} not found") from None
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise MemoryBankError(f"{uri}/{MANIFEST} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise MemoryBankError(f"{uri}/{MANIFEST} is not a storymem memory bank manifest")
        if manifest.get("version") != VERSION:
            raise MemoryBankError(f"{uri}/{MANIFEST}: version {manifest.get('version')!r}, "
                                  f"this code reads version {VERSION}")
        bank = cls(max_size=manifest["max_size"], sink=manifest["sink"])
        metas = manifest["entries"]
        embeddings = {}
        if any(m["has_embedding"] for m in metas):
            embeddings = _read_safetensors(uri, "embeddings.safetensors")
        latents = {key: _read_safetensors(uri, f"latents/{key}.safetensors")
                   for key in manifest.get("latent_resolutions", [])}
        entries = []
        for meta in metas:
            kid = meta["keyframe_id"]
            image = _decode_png(_read(uri, meta["image"]), f"{uri}/{meta['image']}")
            if list(image.shape) != meta["image_shape"] or hashlib.sha256(
                    np.ascontiguousarray(image)).hexdigest() != meta["image_sha256"]:
                raise MemoryBankError(f"{uri}/{meta['image']}: image differs from the one "
                                      "the manifest recorded")
            embedding = None
            if meta["has_embedding"]:
                if kid not in embeddings:
                    raise MemoryBankError(f"{uri}/embeddings.safetensors lacks {kid!r}")
                embedding = embeddings[kid].numpy()
            entry_latents = {}
            for key in meta["latents"]:
                if key not in latents or kid not in latents[key]:
                    raise MemoryBankError(f"{uri}/latents/{key}.safetensors lacks {kid!r}")
                entry_latents[key] = latents[key][kid]
            entries.append(KeyframeEntry(
                keyframe_id=kid, image=image, story_id=meta["story_id"], scene=meta["scene"],
                shot=meta["shot"], frame_index=meta["frame_index"], prompt=meta["prompt"],
                clip_embedding=embedding, aesthetic_score=meta["aesthetic_score"],
                latents=entry_latents, kind=meta["kind"]))
        bank._stored = entries
        bank._ids = {e.keyframe_id for e in entries}
        for entry in entries:
            _check_entry(entry)
        if [e.keyframe_id for e in bank.entries] != manifest["memory"]:
            raise MemoryBankError(f"{uri}/{MANIFEST}: recorded memory {manifest['memory']} "
                                  "does not follow from its entries and policy")
        bank._written_images[uri] = set(bank._ids)
        return bank

    # ---- helpers --------------------------------------------------------------------
    def _embedding_dim(self) -> int | None:
        for entry in self._stored:
            if entry.clip_embedding is not None:
                return entry.clip_embedding.shape[0]
        return None

    @staticmethod
    def _stack_embeddings(entries: Sequence[KeyframeEntry]) -> np.ndarray:
        missing = [e.keyframe_id for e in entries if e.clip_embedding is None]
        if missing:
            raise MemoryBankError(f"entries without a CLIP embedding: {missing}")
        if not entries:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([e.clip_embedding for e in entries]).astype(np.float32, copy=False)


def _check_entry(entry) -> None:
    if not isinstance(entry, KeyframeEntry):
        raise MemoryBankError(f"expected a KeyframeEntry, got {type(entry).__name__}")
    name = entry.keyframe_id
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise MemoryBankError(f"bad keyframe_id {name!r}: a non-empty name without '/'")
    if entry.kind not in KINDS:
        raise MemoryBankError(f"keyframe {name!r}: kind {entry.kind!r} not in {KINDS}")
    image = entry.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise MemoryBankError(f"keyframe {name!r}: image must be a (H, W, 3) uint8 array, got "
                              f"{getattr(image, 'dtype', type(image).__name__)} "
                              f"{getattr(image, 'shape', '')}")
    if entry.clip_embedding is not None:
        vector = entry.clip_embedding
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or \
                vector.dtype != np.float32 or not np.all(np.isfinite(vector)):
            raise MemoryBankError(f"keyframe {name!r}: clip_embedding must be a finite (D,) "
                                  "float32 array")
    for key, latent in entry.latents.items():
        if not isinstance(latent, torch.Tensor):
            raise MemoryBankError(f"keyframe {name!r}: latent {key!r} is not a tensor")


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "RGB":
                raise MemoryBankError(f"{where}: PNG mode {image.mode}, expected RGB")
            return np.array(image, dtype=np.uint8)
    except MemoryBankError:
        raise
    except Exception as exc:
        raise MemoryBankError(f"{where}: not a readable PNG ({exc})") from exc


def _read(uri: str, key: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, key))
    except FileNotFoundError:
        raise MemoryBankError(f"memory bank at {uri}: {key} is missing") from None


def _read_safetensors(uri: str, key: str) -> dict[str, torch.Tensor]:
    data = _read(uri, key)
    try:
        return load_safetensors(data)
    except Exception as exc:
        raise MemoryBankError(f"{uri}/{key}: not a readable safetensors file ({exc})") from exc
