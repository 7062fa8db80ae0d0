"""The prepared training data: sharded Parquet rows, a manifest, an errors table.

Layout under the prepare's `out` (local or s3://):

    shards/shard-{i:05d}-{id}.parquet   one row per clip, one row group per row
    zero_condition.safetensors         the M2V conditioning latents (all-zero video), stamped
                                       with the settings' content id
    clips.parquet                      every usable clip: group, order, keyframes, CLIP mean
    errors.parquet                     refused clips and why (`clip_manifest.ClipError`)
    manifest.json                      geometry, model and scorer ids, shards, counts
    _COMMITTED.json                    written last: every file with size and sha256

A shard row holds one clip: ids, caption, group and order, the clip latent (16, f, h, w),
its MI2V and MM2V conditioning latents, its caption embedding (the rows before the zero
padding), and its memory candidates: up to `memory_candidates` keyframe latents
(M, 16, 1, h, w) of the other clips of its group, in group order (the memory-bank policy
picks which when there are more: the first `memory_sink`, then the most recent). Rows are
self-contained, so any row can be read alone (`PreparedData.row`). Tensors are float32
little-endian bytes with their shapes in the manifest and the row.
"""
from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storymem_model import storage

PREPARED_FORMAT = 1
MANIFEST_FILE = "manifest.json"
CLIPS_FILE = "clips.parquet"
ERRORS_FILE = "errors.parquet"
ZERO_CONDITION_FILE = "zero_condition.safetensors"
SHARDS_DIR = "shards"
LATENT_CHANNELS = 16


class PreparedDataError(ValueError):
    """Prepared data that cannot be used (not committed, wrong format), naming the URI."""


SHARD_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("clip_uri", pa.string()), ("caption", pa.string()),
    ("group_id", pa.string()), ("order", pa.int32()), ("position", pa.int64()),
    ("keyframe_indices", pa.list_(pa.int32())),
    ("latent_shape", pa.list_(pa.int32())),
    ("clip_latent", pa.binary()), ("mi2v_latent", pa.binary()), ("mm2v_latent", pa.binary()),
    ("memory_count", pa.int32()), ("memory_latents", pa.binary()),
    ("memory_sources", pa.list_(pa.string())),
    ("caption_tokens", pa.int32()), ("caption_dim", pa.int32()), ("caption_embedding", pa.binary()),
])


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()


def tensor_from(data: bytes, shape) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    array = np.frombuffer(data, dtype="<f4")
    if array.size != int(np.prod(shape)):
        raise PreparedDataError(f"tensor of {array.size} values does not fit shape {shape}")
    return torch.from_numpy(array.astype(np.float32).reshape(shape))


@dataclass
class PreparedClip:
    """One shard row with its tensors."""

    clip_id: str
    clip_uri: str
    caption: str
    group_id: str
    order: int
    clip_latent: torch.Tensor      # (16, f, h, w)
    mi2v_latent: torch.Tensor      # (16, f, h, w)
    mm2v_latent: torch.Tensor      # (16, f, h, w)
    memory_latents: torch.Tensor   # (M, 16, 1, h, w)
    memory_sources: list[str]      # "{clip_id}:{frame}" per memory latent
    caption_embedding: torch.Tensor  # (n, D)

    @classmethod
    def from_row(cls, row: dict) -> "PreparedClip":
        shape = row["latent_shape"]
        _, _, h, w = shape
        return cls(
            clip_id=row["clip_id"], clip_uri=row["clip_uri"], caption=row["caption"],
            group_id=row["group_id"], order=int(row["order"]),
            clip_latent=tensor_from(row["clip_latent"], shape),
            mi2v_latent=tensor_from(row["mi2v_latent"], shape),
            mm2v_latent=tensor_from(row["mm2v_latent"], shape),
            memory_latents=tensor_from(row["memory_latents"],
                                       (row["memory_count"], LATENT_CHANNELS, 1, h, w)),
            memory_sources=list(row["memory_sources"] or []),
            caption_embedding=tensor_from(row["caption_embedding"],
                                          (row["caption_tokens"], row["caption_dim"])))


def shard_row(*, clip_id: str, clip_uri: str, caption: str, group_id: str, order: int, position: int,
              keyframe_indices: list[int], latents, memory: torch.Tensor, memory_sources: list[str]) -> dict:
    """A shard row from a clip's `encoding.ClipLatents` and its memory candidates."""
    return {
        "clip_id": clip_id, "clip_uri": clip_uri, "caption": caption, "group_id": group_id,
        "order": int(order), "position": int(position),
        "keyframe_indices": [int(i) for i in keyframe_indices],
        "latent_shape": list(latents.clip.shape),
        "clip_latent": tensor_bytes(latents.clip), "mi2v_latent": tensor_bytes(latents.mi2v_condition),
        "mm2v_latent": tensor_bytes(latents.mm2v_condition),
        "memory_count": int(memory.shape[0]), "memory_latents": tensor_bytes(memory),
        "memory_sources": list(memory_sources),
        "caption_tokens": int(latents.caption.shape[0]), "caption_dim": int(latents.caption.shape[1]),
        "caption_embedding": tensor_bytes(latents.caption),
    }


def shard_bytes(rows: list[dict]) -> bytes:
    """A shard file: one row group per row, so a reader fetches exactly the row it wants."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=1, compression="zstd")
    return sink.getvalue()


def write_zero_condition(out: str, latents: torch.Tensor, text_length: int, fingerprint: str) -> None:
    """`out`'s zero-condition file, stamped with the content id of the settings it was made for."""
    from safetensors.torch import save

    tensors = {"latents": latents.contiguous(), "text_length": torch.tensor(text_length)}
    storage.write_bytes(storage.join(out, ZERO_CONDITION_FILE), save(tensors, metadata={"fingerprint": fingerprint}))


def zero_condition_fingerprint(out: str) -> str | None:
    """The content id stamped on `out`'s zero-condition file; None when there is no readable one."""
    try:
        data = storage.read_bytes(storage.join(out, ZERO_CONDITION_FILE))
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the safetensors header
    except (FileNotFoundError, ValueError):
        return None
    return (header.get("__metadata__") or {}).get("fingerprint")


def load_tensor_file(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(storage.read_bytes(uri))


def read_manifest(uri: str, *, require_clips: bool = True) -> dict:
    """The manifest of committed prepared data at `uri`; with `require_clips=False` also
    that of data whose every clip was refused."""
    try:
        committed = storage.is_committed(uri)
    except (storage.StorageError, OSError) as exc:
        raise PreparedDataError(f"{uri}: cannot open the prepared data: {exc}") from exc
    if not committed:
        raise PreparedDataError(f"{uri}: no committed prepared data ({storage.COMMIT_MARKER} missing); "
                                "run `storymem train prepare` first (or let it finish)")
    manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST_FILE)))
    if manifest.get("format") != PREPARED_FORMAT:
        raise PreparedDataError(f"{uri}: prepared data format {manifest.get('format')!r}, this code reads "
                                f"{PREPARED_FORMAT}; prepare it again")
    if require_clips and not manifest.get("shards"):
        raise PreparedDataError(f"{uri}: the prepared data holds no clips (see its {ERRORS_FILE})")
    return manifest


def manifest_sha256(uri: str) -> str:
    return storage.sha256_hex(storage.read_bytes(storage.join(uri, MANIFEST_FILE)))


class PreparedData:
    """Random access to the rows of committed prepared data (local or s3://).

    Row `i` of the data set is row `i - start` of the shard that holds it, in manifest
    order; each row is its own Parquet row group, so reading one fetches only it.
    """

    def __init__(self, uri: str, max_open_files: int = 8):
        self.uri = uri
        self.manifest = read_manifest(uri)
        self.shards = [s["key"] for s in self.manifest["shards"]]
        counts = [int(s["rows"]) for s in self.manifest["shards"]]
        self.starts = np.cumsum([0, *counts])
        self.max_open_files = max_open_files
        self._files: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self._zero: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def geometry(self) -> dict:
        return self.manifest["geometry"]

    @property
    def text_length(self) -> int:
        return int(self.manifest["text_length"])

    @property
    def zero_condition(self) -> torch.Tensor:
        if self._zero is None:
            self._zero = load_tensor_file(storage.join(self.uri, ZERO_CONDITION_FILE))["latents"]
        return self._zero

    def _file(self, key: str) -> pq.ParquetFile:
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        fs, path = storage.filesystem(storage.join(self.uri, key))
        handle = pq.ParquetFile(fs.open(path, "rb"))
        self._files[key] = handle
        while len(self._files) > self.max_open_files:
            self._files.popitem(last=False)[1].close(force=True)  # and the file it reads
        return handle

    def row(self, index: int) -> PreparedClip:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} outside the {len(self)} prepared clips")
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        table = self._file(self.shards[shard]).read_row_group(int(index - self.starts[shard]))
        return PreparedClip.from_row(table.to_pylist()[0])
