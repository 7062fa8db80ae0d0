"""The evaluation report: the Table-1-shaped summary as text and Markdown, and report.md.

Written through `storymem_model.storage` (local or s3://) under the report folder:

    report.md                                  summary, per-story table, charts, notes
    metrics.png                                Table 1 metrics, one bar per method
    stories.png                                cross-shot consistency per story and method
    consistency/{story_id}__{method}.png       shot-by-shot similarity heatmap

(charts: `charts.py`).
"""
from __future__ import annotations

from collections.abc import Sequence

from storymem_model import storage
from storymem_model.evaluation import charts
from storymem_model.evaluation.metrics import (PAPER_STORIES, PAPER_TABLE1, TABLE1_COLUMNS,
                                               TABLE1_HEADERS, format_number)
from storymem_model.evaluation.rows import EvalRow

REPORT_FILE = "report.md"
METRICS_CHART = "metrics.png"
STORIES_CHART = "stories.png"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table1_markdown(summary_rows: Sequence[EvalRow], include_paper: bool = False) -> str:
    """The Table-1-shaped summary as a Markdown table: one row per method (and the paper's
    rows after them with `include_paper`)."""
    header = ["Method", *[TABLE1_HEADERS[c] for c in TABLE1_COLUMNS], "Stories"]
    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    for row in summary_rows:
        lines.append(_markdown_row([str(row.method),
                                    *[format_number(row.metric(c)) for c in TABLE1_COLUMNS],
                                    str(row.num_stories if row.num_stories is not None
                                        else "")]))
    if include_paper:
        for name, values in PAPER_TABLE1.items():
            lines.append(_markdown_row([name, *[format_number(v) for v in values],
                                        str(PAPER_STORIES)]))
    return "\n".join(lines)


def table1_text(summary_rows: Sequence[EvalRow]) -> str:
    """The summary as aligned plain text, for the terminal."""
    header = ["method", *TABLE1_COLUMNS, "stories"]
    body = [[str(r.method), *[format_number(r.metric(c)) for c in TABLE1_COLUMNS],
             str(r.num_stories if r.num_stories is not None else "")] for r in summary_rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def write_report(report_uri: str, shot_rows: Sequence[EvalRow], story_rows: Sequence[EvalRow],
                 summary_rows: Sequence[EvalRow], *, title: str = "ST-Bench evaluation",
                 notes: Sequence[str] = ()) -> dict[str, str]:
    """Write report.md and every chart under `report_uri`; returns {name: uri}."""
    written: dict[str, str] = {}

    def put(key: str, data: bytes) -> str:
        uri = storage.join(report_uri, key)
        storage.write_bytes(uri, data)
        written[key] = uri
        return key

    metrics_key = put(METRICS_CHART, charts.metrics_chart(summary_rows))
    stories_key = put(STORIES_CHART, charts.stories_chart(story_rows))
    evaluated = [r for r in story_rows if not r.error]
    heatmaps = []
    for row in evaluated:
        if not row.num_shots:
            continue
        shots = sorted((r for r in shot_rows
                        if r.story_id == row.story_id and r.method == row.method),
                       key=lambda r: r.shot_index)
        key = put(charts.heatmap_key(row.story_id, row.method), charts.consistency_heatmap(
            row.matrix(), [f"{r.scene}.{r.shot}" for r in shots],
            f"{row.story_name or row.story_id} - {row.method}"))
        heatmaps.append((row, key))

    lines = [f"# {title}", "", "## Summary (Table 1 columns)", "",
             table1_markdown(summary_rows), "",
             f"For reference, the paper's numbers (real weights, {PAPER_STORIES} ST-Bench "
             "stories):", "",
             table1_markdown([], include_paper=True), "",
             f"![metrics]({metrics_key})", "", "## Stories", ""]
    header = ["Story", "Method", "Shots", *[TABLE1_HEADERS[c] for c in TABLE1_COLUMNS]]
    lines += [_markdown_row(header), "|" + "---|" * len(header)]
    for row in evaluated:
        lines.append(_markdown_row([str(row.story_name or row.story_id), str(row.method),
                                    str(row.num_shots),
                                    *[format_number(row.metric(c)) for c in TABLE1_COLUMNS]]))
    lines += ["", f"![consistency per story]({stories_key})", ""]
    errors = [r for r in story_rows if r.error]
    if errors:
        lines += ["## Not evaluated", ""]
        lines += [f"- `{r.story_id}` ({r.method}): {r.error}" for r in errors]
        lines.append("")
    if heatmaps:
        lines += ["## Shot-by-shot consistency", ""]
        for row, key in heatmaps:
            lines += [f"### {row.story_name or row.story_id} - {row.method}", "",
                      f"![{row.story_id}]({key})", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    put(REPORT_FILE, "\n".join(lines).encode("utf-8"))
    return written
