"""Typed records that cross boundaries (storage, Ray, HTTP), and Arrow schemas derived from them.

A record is a dataclass whose fields carry their Arrow type in the field metadata
(`arrow_field(...)`) or derive it from the annotation (str -> string, int -> int64,
float -> float64, bool -> bool). `arrow_schema(cls)` builds the Parquet schema from the
class, so a table's columns are always the record's fields, in order; `to_row()` /
`from_row()` convert to and from plain dicts (JSON files, Parquet rows).

`ShotRecord` is one rendered shot: the row of a story's `shots.parquet` and the content of
its `shots/{scene}_{shot}.json` checkpoint. `ShotStats` is what the pipeline fills with a
shot's cost (its record's cost columns). `ShotDone` is the progress event a story runner
emits per finished shot.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")

_ANNOTATION_TYPES = {"str": "string", "int": "int64", "float": "float64", "bool": "bool"}


def arrow_field(arrow_type: str, **kwargs):
    """A dataclass field with its Arrow type name: string, int32, int64, float32, float64,
    bool, or list<T> for lists."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["arrow"] = arrow_type
    return field(metadata=metadata, **kwargs)


def _arrow_type(name: str):
    import pyarrow as pa

    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[5:-1]))
    types = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(),
             "float32": pa.float32(), "float64": pa.float64(), "bool": pa.bool_()}
    return types[name]


def _field_type_name(f: dataclasses.Field, hint: Any) -> str:
    if "arrow" in f.metadata:
        return f.metadata["arrow"]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    name = getattr(base, "__name__", str(base))
    if name not in _ANNOTATION_TYPES:
        raise TypeError(f"{f.name}: give its Arrow type with arrow_field(...)")
    return _ANNOTATION_TYPES[name]


class Record:
    """Mixin for record dataclasses: plain rows and a derived Arrow schema."""

    @classmethod
    def arrow_schema(cls):
        import pyarrow as pa

        hints = typing.get_type_hints(cls)
        return pa.schema([(f.name, _arrow_type(_field_type_name(f, hints[f.name])))
                          for f in dataclasses.fields(cls)])

    @classmethod
    def column_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_row(self) -> dict[str, Any]:
        row = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            row[f.name] = list(value) if isinstance(value, tuple) else value
        return row

    @classmethod
    def from_row(cls: type[R], row: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    @classmethod
    def table(cls, records):
        """A pyarrow Table of `records` (records or row dicts) with the derived schema."""
        import pyarrow as pa

        rows = [r.to_row() if isinstance(r, Record) else r for r in records]
        schema = cls.arrow_schema()
        return pa.Table.from_pydict({name: [row.get(name) for row in rows]
                                     for name in schema.names}, schema=schema)


@dataclass
class ShotRecord(Record):
    """One rendered shot: a row of shots.parquet and its JSON checkpoint."""

    story_id: str
    story_name: str
    config_hash: str
    scene: int = arrow_field("int32")
    shot: int = arrow_field("int32")
    shot_index: int = arrow_field("int32")
    prompt: str = ""
    first_frame_prompt: str | None = None
    cut: bool = True
    mode: str = "m2v"  # a ShotMode value
    seed: int = 0
    memory_keyframe_ids: list = arrow_field("list<string>", default_factory=list)
    num_frames: int = arrow_field("int32", default=0)
    fps: int = arrow_field("int32", default=0)
    height: int = arrow_field("int32", default=0)
    width: int = arrow_field("int32", default=0)
    video_key: str = ""
    video_uri: str = ""
    video_sha256: str = ""
    keyframe_ids: list = arrow_field("list<string>", default_factory=list)
    keyframe_frame_indices: list = arrow_field("list<int32>", default_factory=list)
    keyframe_scores: list = arrow_field("list<float32>", default_factory=list)
    model_id: str | None = None
    lora_id: str | None = None
    t2v_model_id: str | None = None
    generate_seconds: float = 0.0
    select_seconds: float = 0.0
    write_seconds: float = 0.0
    shot_seconds: float = 0.0
    # cost: transformer evaluations x batch (40-step CFG = 80, `fast` = 4) and the seconds
    # spent denoising (accelerator-synchronised), the GPU time a shot is billed for
    model_evaluations: int = arrow_field("int32", default=0)
    denoise_seconds: float = 0.0

    # Checkpoint identity: a stored shot is trusted only if it is this script's shot.
    def matches(self, spec) -> bool:
        return (self.scene, self.shot, self.prompt, self.cut) == (
            spec.scene, spec.shot, spec.prompt, spec.cut)


@dataclass
class ShotStats:
    """Filled by the pipeline (`generate_shot(..., stats=)`): what the shot cost."""

    model_evaluations: int = 0  # transformer evaluations x batch (40-step CFG: 80)
    denoise_seconds: float = 0.0


TIMING_COLUMNS = ("generate_seconds", "select_seconds", "write_seconds", "shot_seconds",
                  "denoise_seconds")


@dataclass(frozen=True)
class ShotDone(Record):
    """Progress event: one shot of a story finished (and is checkpointed)."""

    story_id: str
    shot_index: int
    shots_total: int
    scene: int
    shot: int
    mode: str
    seconds: float
