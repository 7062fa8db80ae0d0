"""Lazy, bounded listing of story scripts for the batch.

`--scripts URI` may be (local path or any fsspec URL such as s3://bucket/prefix):
- a folder or prefix: every `*.json` / `*.json5` file below it, recursively;
- a glob: `s3://bucket/scripts/*.json`, `scripts/**/*.json5`;
- one script file (`.json` / `.json5`);
- a manifest, one script per row:
  - JSON Lines (`.jsonl`, `.ndjson`): each line is a string (a script URI), or an object
    with `"uri"` (a script URI, optional `"name"`) or `"script"` (the script itself, inline:
    an ST-Bench object or a list of prompts, optional `"name"`);
  - Parquet (`.parquet`): a `uri` column and/or a `script` column (inline script as JSON
    or JSON5 text), optional `name`.
  Relative URIs in a manifest are relative to the manifest's folder. An object row (a
  Parquet row) may give its `position` and `source`: its place in, and its name for, the
  listing it was planned from (the flows' manifest of pending stories keeps each story's
  place and source, so the run tables number and name rows the same whether or not a
  batch ran). Positions must grow from row to row; a row without one takes the next after
  the previous row's; a row without a source is named by its manifest line.

Nothing here holds all scripts at once: folders are walked directory by directory, JSONL
is streamed line by line and Parquet row batch by row batch, and a script is only read when
the consumer asks for it (`read_script`). Listing problems (a bad manifest row) are yielded
as `ListingProblem`s in order, so the batch records them and goes on.

Bounds (a manifest is input like a script, so nothing in it is read unbounded):
- a JSONL line longer than `MAX_MANIFEST_LINE_BYTES` (the script limit plus room for the
  row around it) is a problem row; it is skipped chunk by chunk, never held whole;
- a Parquet `script` cell longer than the script limit, or a `uri`/`name` cell longer than
  `MAX_URI_CHARS`, is a problem row (its value is never turned into a Python string); a
  row group whose columns hold more than `MAX_PARQUET_ROW_GROUP_BYTES` (uncompressed, from
  the file's metadata) is not read at all: each of its rows is a problem row;
- an inline script (a JSONL row, a `script` cell) nested deeper than a script may be is a
  problem row, found before any JSON parser recurses into it; one given as text is parsed
  as a script file is (`story_script.parse_script_text`: size, UTF-8, nesting, JSON/JSON5);
- a listed script file is read with the script limit (`story_script.load_script`): a
  multi-GB object or /dev/zero is refused after reading at most that many bytes.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

from storymem_model import storage
from storymem_model.story_script import (MAX_NESTING, MAX_SCRIPT_BYTES, ScriptError,
                                         parse_script_text, text_nesting_depth)

SCRIPT_SUFFIXES = (".json", ".json5")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
GLOB_CHARS = "*?["
PARQUET_ROWS_PER_READ = 256
MANIFEST_ROW_OVERHEAD_BYTES = 64 * 1024  # the row around an inline script: keys, name, uri
MAX_MANIFEST_LINE_BYTES = MAX_SCRIPT_BYTES + MANIFEST_ROW_OVERHEAD_BYTES
MAX_URI_CHARS = 4096  # a `uri` or `name` value of a manifest row
MAX_PARQUET_ROW_GROUP_BYTES = 256 * 1024 * 1024  # uncompressed, over the columns read
MANIFEST_ROW_NESTING = 2  # a JSONL row object and its "script" value around the script
READ_CHUNK_BYTES = 64 * 1024


class ScriptSourceError(ValueError):
    """The --scripts URI itself cannot be listed (missing, wrong kind, unreadable)."""


@dataclass(frozen=True)
class ListedScript:
    """One script found by the listing; its content is read later by `read_script`."""

    position: int  # 0-based place in the listing (or the one its manifest row gives)
    origin: str  # where it came from: a URI, "manifest.jsonl line 3", or the row's `source`
    uri: str | None = None  # a script file to read ...
    inline: Any = None  # ... or the script itself (dict or list) from a manifest row
    name: str | None = None  # optional name (stands in for the file stem)


@dataclass(frozen=True)
class ListingProblem:
    """A manifest row that does not describe a script; recorded in errors.parquet."""

    position: int
    origin: str
    message: str


def list_scripts(uri: str, exclude: str | None = None) -> Iterator[ListedScript | ListingProblem]:
    """Yield every script of `uri` in a stable order (see the module docstring).

    `exclude`: a folder/prefix never listed (the batch passes its output URI, so outputs
    written below the scripts folder are not taken for scripts)."""
    if not isinstance(uri, str) or not uri.strip():
        raise ScriptSourceError(f"--scripts must be a path or URI, got {uri!r}")
    fs, path = storage.filesystem(uri)
    protocol = _protocol_prefix(uri)
    counter = _Counter()
    if any(ch in path for ch in GLOB_CHARS):
        skip = storage.filesystem(exclude)[1].rstrip("/") + "/" if exclude else None
        matches = [m for m in sorted(fs.glob(path)) if not (skip and m.startswith(skip))]
        if not matches:
            raise ScriptSourceError(f"--scripts {uri}: the pattern matches no file")
        for match in matches:
            if not fs.isdir(match):
                yield ListedScript(counter.next(), protocol + match, uri=protocol + match)
        return
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)
    if fs.isdir(path):
        skip = storage.filesystem(exclude)[1].rstrip("/") + "/" if exclude else None
        yield from _walk_folder(fs, path, protocol, counter, uri, skip)
        return
    if not fs.exists(path):
        raise ScriptSourceError(f"--scripts {uri}: no such file, folder or prefix")
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(fs, path, uri, counter)
    elif lower.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(fs, path, uri, counter)
    elif lower.endswith(SCRIPT_SUFFIXES):
        yield ListedScript(counter.next(), uri, uri=uri)
    else:
        raise ScriptSourceError(
            f"--scripts {uri}: not a folder, a glob, a script ({', '.join(SCRIPT_SUFFIXES)}) "
            f"or a manifest ({', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})")


def read_script(item: ListedScript):
    """Read and validate one listed script -> StoryScript (raises ScriptError)."""
    from storymem_model.story_script import load_script

    if item.uri is not None:
        return load_script(item.uri, name=item.name)
    return load_script(item.inline, name=item.name or item.origin)


# ---------------------------------------------------------------------------------------
class _Counter:
    def __init__(self):
        self.value = -1

    def next(self) -> int:
        self.value += 1
        return self.value

    def row_position(self, value: Any, origin: str) -> tuple[int, str | None]:
        """(position, problem) of a manifest row: the `position` an object row gives, when
        it comes after every earlier one, else the next; a problem names a bad one."""
        given = value.get("position") if isinstance(value, dict) else None
        if given is None:
            return self.next(), None
        if isinstance(given, bool) or not isinstance(given, int) or given <= self.value:
            return self.next(), (f"{origin}: 'position' must be an integer greater than the "
                                 f"previous row's ({self.value}), got {given!r}")
        self.value = given
        return given, None


def _protocol_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def _walk_folder(fs, root: str, protocol: str, counter: _Counter, uri: str,
                 skip: str | None = None):
    found = False
    # fs.walk lists one directory at a time; sorting in place keeps the order stable.
    for folder, dirs, files in fs.walk(root, topdown=True):
        if skip and (folder.rstrip("/") + "/").startswith(skip):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(SCRIPT_SUFFIXES):
                continue
            found = True
            full = posixpath.join(folder, name)
            yield ListedScript(counter.next(), protocol + full, uri=protocol + full)
    if not found:
        raise ScriptSourceError(
            f"--scripts {uri}: the folder holds no {' or '.join(SCRIPT_SUFFIXES)} file")


def _resolve(manifest_uri: str, ref: str) -> str:
    if "://" in ref or ref.startswith("/"):
        return ref
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    return posixpath.normpath(posixpath.join(base, ref)) if "://" not in base else \
        base + "/" + posixpath.normpath(ref)


def _row(manifest_uri: str, origin: str, counter: _Counter, value: Any):
    """One manifest row (already parsed) -> ListedScript or ListingProblem."""
    position, problem = counter.row_position(value, origin)
    if problem is not None:
        return ListingProblem(position, origin, problem)
    if isinstance(value, str):
        if not value.strip():
            return ListingProblem(position, origin, f"{origin}: empty script URI")
        if len(value) > MAX_URI_CHARS:
            return ListingProblem(position, origin, f"{origin}: the script URI has "
                                  f"{len(value)} characters, more than the limit of "
                                  f"{MAX_URI_CHARS}")
        return ListedScript(position, origin, uri=_resolve(manifest_uri, value.strip()))
    if isinstance(value, dict):
        for key in ("name", "source"):
            text = value.get(key)
            if text is not None and not isinstance(text, str):
                return ListingProblem(position, origin, f"{origin}: '{key}' must be a string")
            if text is not None and len(text) > MAX_URI_CHARS:
                return ListingProblem(position, origin, f"{origin}: '{key}' has {len(text)} "
                                      f"characters, more than the limit of {MAX_URI_CHARS}")
        name, source = value.get("name"), value.get("source") or origin
        has_uri, has_script = value.get("uri") is not None, value.get("script") is not None
        if has_uri and has_script:
            return ListingProblem(position, origin,
                                  f"{origin}: give either 'uri' or 'script', not both")
        if has_uri:
            if not isinstance(value["uri"], str) or not value["uri"].strip():
                return ListingProblem(position, origin, f"{origin}: 'uri' must be a non-empty string")
            if len(value["uri"]) > MAX_URI_CHARS:
                return ListingProblem(position, origin, f"{origin}: 'uri' has "
                                      f"{len(value['uri'])} characters, more than the limit "
                                      f"of {MAX_URI_CHARS}")
            return ListedScript(position, source,
                                uri=_resolve(manifest_uri, value["uri"].strip()), name=name)
        if has_script:
            script = value["script"]
            if isinstance(script, str):  # Parquet/JSONL may carry the script as JSON text
                try:
                    script = parse_script_text(script.encode("utf-8", "surrogatepass"),
                                               f"{origin}: the inline 'script'")
                except ScriptError as exc:
                    return ListingProblem(position, origin, "; ".join(exc.problems))
            if not isinstance(script, (dict, list)):
                return ListingProblem(position, origin,
                                      f"{origin}: 'script' must be an object or a list of prompts")
            return ListedScript(position, source, inline=script, name=name)
        return ListingProblem(position, origin, f"{origin}: a row needs 'uri' or 'script'")
    return ListingProblem(position, origin,
                          f"{origin}: a row must be a URI string or an object with "
                          f"'uri' or 'script', got {type(value).__name__}")


def bounded_lines(handle, limit: int, chunk_bytes: int = READ_CHUNK_BYTES):
    """(line number, line bytes or None, length) for each line of a binary stream. A line
    longer than `limit` bytes comes as None with its length; it is skipped chunk by chunk,
    so no more than `limit` + one chunk is ever held."""
    line_no, length, overlong = 0, 0, False
    buffer = bytearray()
    while True:
        chunk = handle.read(chunk_bytes)
        if not chunk:
            break
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline < 0 else newline
            length += end - start
            if not overlong:
                if len(buffer) + end - start > limit:
                    overlong = True
                    buffer.clear()
                else:
                    buffer += chunk[start:end]
            if newline < 0:
                break
            line_no += 1
            yield line_no, None if overlong else bytes(buffer), length
            buffer.clear()
            length, overlong, start = 0, False, newline + 1
    if length:
        yield line_no + 1, None if overlong else bytes(buffer), length


def _read_jsonl(fs, path: str, uri: str, counter: _Counter):
    with fs.open(path, "rb") as handle:
        for line_no, raw, length in bounded_lines(handle, MAX_MANIFEST_LINE_BYTES):
            origin = f"{uri} line {line_no}"
            if raw is None:
                yield ListingProblem(counter.next(), origin, (
                    f"{origin}: the line has {length} bytes, more than the limit of "
                    f"{MAX_MANIFEST_LINE_BYTES} (a script of at most {MAX_SCRIPT_BYTES} "
                    f"bytes and its row); not read"))
                continue
            line = raw.strip()
            if not line:
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield ListingProblem(counter.next(), origin, f"{origin}: not UTF-8 text: {exc}")
                continue
            depth = text_nesting_depth(text)
            if depth > MAX_NESTING + MANIFEST_ROW_NESTING:
                yield ListingProblem(counter.next(), origin, (
                    f"{origin}: nested {depth} levels deep, more than a manifest row with "
                    f"a script may be ({MAX_NESTING + MANIFEST_ROW_NESTING})"))
                continue
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:
                yield ListingProblem(counter.next(), origin, f"{origin}: not valid JSON: {exc}")
                continue
            yield _row(uri, origin, counter, value)


CELL_LIMITS = {"script": MAX_SCRIPT_BYTES, "uri": MAX_URI_CHARS, "name": MAX_URI_CHARS,
               "source": MAX_URI_CHARS, "position": MAX_URI_CHARS}


def _read_parquet(fs, path: str, uri: str, counter: _Counter):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ScriptSourceError(f"--scripts {uri}: not a readable Parquet file: {exc}") from exc
        names = parquet.schema_arrow.names
        columns = [c for c in ("uri", "script", "name", "source", "position") if c in names]
        if "uri" not in columns and "script" not in columns:
            raise ScriptSourceError(
                f"--scripts {uri}: a Parquet manifest needs a 'uri' or 'script' column, "
                f"found {names}")
        metadata = parquet.metadata
        row_no = 0
        for group in range(metadata.num_row_groups):
            meta = metadata.row_group(group)
            size = _row_group_bytes(meta, columns)
            if size > MAX_PARQUET_ROW_GROUP_BYTES:
                for _ in range(meta.num_rows):
                    row_no += 1
                    origin = f"{uri} row {row_no}"
                    yield ListingProblem(counter.next(), origin, (
                        f"{origin}: row group {group} holds {size} bytes in the columns "
                        f"{columns}, more than the limit of {MAX_PARQUET_ROW_GROUP_BYTES}; "
                        f"not read (write the manifest with smaller row groups)"))
                continue
            for batch in parquet.iter_batches(batch_size=PARQUET_ROWS_PER_READ,
                                              row_groups=[group], columns=columns):
                lengths = {c: _cell_lengths(batch.column(c)) for c in columns}
                for i in range(batch.num_rows):
                    row_no += 1
                    origin = f"{uri} row {row_no}"
                    over = [(c, lengths[c][i]) for c in columns if lengths[c] is not None
                            and lengths[c][i] is not None and lengths[c][i] > CELL_LIMITS[c]]
                    if over:
                        column, length = over[0]
                        yield ListingProblem(counter.next(), origin, (
                            f"{origin}: the '{column}' cell has {length} bytes, more than "
                            f"the limit of {CELL_LIMITS[column]}; not read"))
                        continue
                    row = {c: batch.column(c)[i].as_py() for c in columns}
                    value = {k: v for k, v in row.items() if v is not None}
                    yield _row(uri, origin, counter, value)


def _row_group_bytes(row_group, columns: list[str]) -> int:
    """Uncompressed bytes of the leaf column chunks under `columns` (file metadata only)."""
    total = 0
    for i in range(row_group.num_columns):
        chunk = row_group.column(i)
        if chunk.path_in_schema.split(".")[0] in columns:
            total += int(chunk.total_uncompressed_size)
    return total


def _cell_lengths(column) -> list | None:
    """Byte length of each string/binary cell (None for nulls), without converting the
    values; None for columns of other types."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        return None
    return pc.binary_length(column).to_pylist()
