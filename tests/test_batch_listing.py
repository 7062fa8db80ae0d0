"""Script listing for the batch: folders, prefixes, globs, JSONL/Parquet manifests; lazy."""
from __future__ import annotations

import itertools
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.script_source import (
    ListedScript, ListingProblem, ScriptSourceError, list_scripts, read_script)
from storymem_model import storage
from storymem_model.story_script import ScriptError


def _story(name: str, shots: int = 2) -> dict:
    return {"story_name": name, "story_overview": f"{name} overview",
            "scenes": [{"scene_num": 1, "video_prompts": [f"{name} shot {i}" for i in range(shots)],
                        "cut": [True] + [False] * (shots - 1)}]}


def _write(uri: str, data) -> None:
    storage.write_bytes(uri, json.dumps(data).encode())


def test_folder_is_listed_recursively_in_stable_order(tmp_path):
    _write(str(tmp_path / "b.json"), _story("b"))
    _write(str(tmp_path / "a.json"), _story("a"))
    _write(str(tmp_path / "sub" / "c.json5"), _story("c"))
    (tmp_path / "notes.txt").write_text("not a script")
    (tmp_path / ".hidden.json").write_text("{}")
    items = list(list_scripts(str(tmp_path)))
    assert [i.uri.rsplit("/", 1)[1] for i in items] == ["a.json", "b.json", "c.json5"]
    assert [i.position for i in items] == [0, 1, 2]
    assert read_script(items[2]).story_name == "c"
    # outputs written below the scripts folder are never taken for scripts
    _write(str(tmp_path / "out" / "story" / "config.json"), {"a": 1})
    again = list(list_scripts(str(tmp_path), exclude=str(tmp_path / "out")))
    assert [i.uri for i in again] == [i.uri for i in items]


def test_glob_and_single_file(tmp_path):
    for name in ("x1", "x2", "y1"):
        _write(str(tmp_path / f"{name}.json"), _story(name))
    items = list(list_scripts(str(tmp_path / "x*.json")))
    assert [read_script(i).story_name for i in items] == ["x1", "x2"]
    single = list(list_scripts(str(tmp_path / "y1.json")))
    assert len(single) == 1 and read_script(single[0]).story_name == "y1"


def test_jsonl_manifest_with_uris_inline_scripts_and_bad_rows(tmp_path):
    _write(str(tmp_path / "scripts" / "one.json"), _story("one"))
    lines = [
        json.dumps("scripts/one.json"),  # relative to the manifest
        json.dumps({"script": _story("two"), "name": "two"}),
        "{this is not json",
        json.dumps({"script": ["a plain prompt", "another"], "name": "plain"}),
        json.dumps(42),
        "",
        json.dumps({"uri": "scripts/missing.json"}),
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    items = list(list_scripts(str(manifest)))
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["ListedScript", "ListedScript", "ListingProblem", "ListedScript",
                     "ListingProblem", "ListedScript"]
    assert [i.position for i in items] == list(range(6))
    assert read_script(items[0]).story_name == "one"
    assert read_script(items[1]).story_name == "two"
    assert "line 3" in items[2].message and "not valid JSON" in items[2].message
    assert len(read_script(items[3]).shots) == 2
    assert "line 5" in items[4].message
    with pytest.raises(ScriptError, match="file not found"):
        read_script(items[5])


def test_parquet_manifest_on_s3(s3_bucket):
    _write(f"{s3_bucket}/in/a.json", _story("a"))
    table = pa.table({
        "uri": ["a.json", None, None],
        "script": [None, json.dumps(_story("b")), "[not json"],
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(f"{s3_bucket}/in/manifest.parquet", sink.getvalue().to_pybytes())
    items = list(list_scripts(f"{s3_bucket}/in/manifest.parquet"))
    assert isinstance(items[0], ListedScript) and items[0].uri == f"{s3_bucket}/in/a.json"
    assert read_script(items[0]).story_name == "a"
    assert read_script(items[1]).story_name == "b"
    assert isinstance(items[2], ListingProblem) and "row 3" in items[2].message


def test_s3_prefix_and_glob(s3_bucket):
    for name in ("p2", "p1"):
        _write(f"{s3_bucket}/scripts/{name}.json", _story(name))
    _write(f"{s3_bucket}/scripts/deeper/p3.json", _story("p3"))
    prefix = [read_script(i).story_name for i in list_scripts(f"{s3_bucket}/scripts")]
    assert prefix == ["p1", "p2", "p3"]
    globbed = [i.uri for i in list_scripts(f"{s3_bucket}/scripts/*.json")]
    assert globbed == [f"{s3_bucket}/scripts/p1.json", f"{s3_bucket}/scripts/p2.json"]


def test_unusable_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ScriptSourceError, match="no such file"):
        list(list_scripts(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScriptSourceError, match="holds no"):
        list(list_scripts(str(tmp_path / "empty")))
    with pytest.raises(ScriptSourceError, match="matches no file"):
        list(list_scripts(str(tmp_path / "*.json")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ScriptSourceError, match="not a folder"):
        list(list_scripts(str(tmp_path / "x.csv")))
    pq.write_table(pa.table({"other": [1]}), str(tmp_path / "m.parquet"))
    with pytest.raises(ScriptSourceError, match="'uri' or 'script' column"):
        list(list_scripts(str(tmp_path / "m.parquet")))


def test_ten_thousand_row_manifest_is_streamed_not_loaded(tmp_path):
    """A 10,000-script manifest: the first items come without reading the rest, and going
    through all of it never holds more than a small, bounded amount of memory."""
    manifest = tmp_path / "big.jsonl"
    story = _story("big", shots=8)
    with open(manifest, "w") as handle:
        for i in range(10_000):
            handle.write(json.dumps({"script": {**story, "story_name": f"s{i}"}}) + "\n")
    size = manifest.stat().st_size
    assert size > 2_000_000

    tracemalloc.start()
    first = list(itertools.islice(list_scripts(str(manifest)), 3))
    _, peak_first = tracemalloc.get_traced_memory()
    assert [read_script(i).story_name for i in first] == ["s0", "s1", "s2"]
    tracemalloc.reset_peak()
    count = 0
    for item in list_scripts(str(manifest)):
        count += 1  # each item is dropped right away, as the batch does once it is done
    _, peak_all = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 10_000
    assert peak_first < size / 10, peak_first
    assert peak_all < size / 10, peak_all


# ---------------------------------------------------------------------------------------
# Bounds: nothing in a manifest is read unbounded (lines, cells, row groups, nesting, and
# the objects its rows point at).
def _peak_while(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_overlong_jsonl_line_is_a_problem_row_skipped_without_holding_it(tmp_path):
    from pipelines.script_source import MAX_MANIFEST_LINE_BYTES

    manifest = tmp_path / "m.jsonl"
    huge = 40 * 1024 * 1024  # 40 MB on one line, far over the limit
    with open(manifest, "wb") as handle:
        handle.write(json.dumps({"script": _story("before")}).encode() + b"\n")
        handle.write(b'{"script": {"story_name": "' + b"x" * huge + b'"}}\n')
        handle.write(json.dumps({"script": _story("after")}).encode())  # no final newline
    items, peak = _peak_while(lambda: list(list_scripts(str(manifest))))
    assert [type(i).__name__ for i in items] == ["ListedScript", "ListingProblem",
                                                 "ListedScript"]
    assert "line 2" in items[1].message and str(MAX_MANIFEST_LINE_BYTES) in items[1].message
    assert f"{huge + 30} bytes" in items[1].message and "not read" in items[1].message
    assert read_script(items[2]).story_name == "after"
    assert peak < 4 * MAX_MANIFEST_LINE_BYTES, peak  # never the 40 MB line


def test_deeply_nested_manifest_rows_are_problem_rows_not_a_crash(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        deep,  # the row itself: json would recurse out
        json.dumps({"script": deep}),  # an inline script given as JSON text
        json.dumps({"script": _story("fine")}),
    ]) + "\n")
    items = list(list_scripts(str(manifest)))
    assert [type(i).__name__ for i in items] == ["ListingProblem", "ListingProblem",
                                                 "ListedScript"]
    assert "line 1: nested 5000 levels deep" in items[0].message
    assert "line 2" in items[1].message and "nested 5000 levels deep" in items[1].message
    assert read_script(items[2]).story_name == "fine"


def test_oversized_parquet_cells_and_row_groups_are_problem_rows(tmp_path, monkeypatch):
    import pipelines.script_source as script_source
    from storymem_model.story_script import MAX_SCRIPT_BYTES

    big_story = {**_story("big"), "story_overview": "o" * (MAX_SCRIPT_BYTES + 10)}
    table = pa.table({
        "script": [json.dumps(_story("small")), json.dumps(big_story), None,
                   "[" * 100 + "]" * 100],
        "uri": [None, None, "a/" * 3000 + "x.json", None],
    })
    path = tmp_path / "m.parquet"
    pq.write_table(table, str(path), row_group_size=2)
    items = list(list_scripts(str(path)))
    assert [type(i).__name__ for i in items] == ["ListedScript", "ListingProblem",
                                                 "ListingProblem", "ListingProblem"]
    assert "row 2: the 'script' cell has" in items[1].message and "not read" in items[1].message
    assert "row 3: the 'uri' cell has 6006 bytes" in items[2].message
    assert "row 4: the inline 'script': nested 100 levels deep" in items[3].message
    # a row group bigger than the limit is not read at all: each of its rows is named
    monkeypatch.setattr(script_source, "MAX_PARQUET_ROW_GROUP_BYTES", 100)
    pq.write_table(pa.table({"script": [json.dumps(_story("a")), json.dumps(_story("b"))]}),
                   str(tmp_path / "g.parquet"))
    rows = list(list_scripts(str(tmp_path / "g.parquet")))
    assert [type(i).__name__ for i in rows] == ["ListingProblem"] * 2
    assert all("row group 0 holds" in r.message and "smaller row groups" in r.message
               for r in rows)


def test_rows_pointing_at_endless_or_huge_objects_are_refused_unread(tmp_path):
    """A manifest row naming /dev/zero or a 3 GB (sparse) file: a ScriptError in the plan,
    in bounded time and memory; the other rows are planned."""
    import time

    from pipelines.story_planner import InvalidScript, PlannedStory, plan_items
    from storymem_model.story_script import MAX_SCRIPT_BYTES

    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(3 * 1024 ** 3)
    _write(str(tmp_path / "ok.json"), _story("ok"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in (
        {"uri": "/dev/zero"}, {"uri": "huge.json"}, {"uri": "ok.json"})) + "\n")
    started = time.monotonic()
    items, peak = _peak_while(lambda: list(plan_items(str(manifest), str(tmp_path / "out"),
                                                      "h" * 16)))
    assert time.monotonic() - started < 30
    assert peak < 8 * MAX_SCRIPT_BYTES, peak
    assert [type(i) for i in items] == [InvalidScript, InvalidScript, PlannedStory]
    for item, name in zip(items, ("/dev/zero", "huge.json")):
        assert item.error_type == "ScriptError" and name in item.message
        assert f"more than the limit of {MAX_SCRIPT_BYTES} bytes" in item.message


def test_a_script_the_reader_chokes_on_is_an_invalid_row_and_the_listing_goes_on(
        tmp_path, monkeypatch):
    import pipelines.story_planner as story_planner

    _write(str(tmp_path / "a.json"), _story("a"))
    _write(str(tmp_path / "b.json"), _story("b"))
    real = story_planner.read_script

    def choking(item):
        if item.uri.endswith("a.json"):
            raise RecursionError("maximum recursion depth exceeded")
        return real(item)

    monkeypatch.setattr(story_planner, "read_script", choking)
    items = list(story_planner.plan_items(str(tmp_path), str(tmp_path / "out"), "h" * 16))
    assert [type(i).__name__ for i in items] == ["InvalidScript", "PlannedStory"]
    assert items[0].error_type == "ScriptError"
    assert "a.json cannot be read: RecursionError" in items[0].message


def test_manifest_rows_may_give_their_source_and_position_and_positions_only_grow(tmp_path):
    lines = [json.dumps({"script": ["one"], "position": 3}),
             json.dumps({"script": ["two"]}),  # the next after the previous row's
             json.dumps({"script": ["three"], "position": 4}),  # not after 4
             json.dumps({"script": ["four"], "position": True}),
             json.dumps({"script": ["five"], "position": "9"}),
             json.dumps({"script": ["six"], "position": 10, "source": "src.jsonl line 2"})]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    items = list(list_scripts(str(manifest)))
    assert [(type(i).__name__, i.position) for i in items] == [
        ("ListedScript", 3), ("ListedScript", 4), ("ListingProblem", 5),
        ("ListingProblem", 6), ("ListingProblem", 7), ("ListedScript", 10)]
    assert all("'position' must be an integer greater than the previous row's" in i.message
               for i in items[2:5])
    assert items[5].origin == "src.jsonl line 2" and items[0].origin.endswith("line 1")
    assert read_script(items[5]).source == "src.jsonl line 2"
    table = pa.table({"script": [json.dumps(["a"]), json.dumps(["b"])], "position": [2, 7]})
    pq.write_table(table, str(tmp_path / "manifest.parquet"))
    assert [i.position for i in list_scripts(str(tmp_path / "manifest.parquet"))] == [2, 7]
