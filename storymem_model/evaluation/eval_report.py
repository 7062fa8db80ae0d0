"""ST-Bench evaluation report: the Table-1-shaped summary, Markdown, PNG charts.

Input is what `storymem_model.evaluation` computes (rows of plain dicts); output is
written through `storymem_model.storage` (local or s3://):

    {report}/report.md                      summary table, per-story table, chart links
    {report}/metrics.png                    Table-1 metrics, one bar per method
    {report}/stories.png                    cross-shot consistency per story and method
    {report}/consistency/{story_id}__{method}.png   shot-by-shot similarity heatmap

Charts are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend). Every PNG also carries the numbers it shows as JSON in its "storymem" text
chunk, so a reader (or a test) can check a chart against the table without OCR.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence

import numpy as np

from storymem_model import storage
from storymem_model.evaluation.metrics import PAPER_TABLE1, TABLE1_COLUMNS

TABLE1_HEADERS = {
    "aesthetic_quality": "Aesthetic Quality",
    "prompt_following_global": "Prompt Following (Global)",
    "prompt_following_single_shot": "Prompt Following (Single-Shot)",
    "consistency_all_pairs": "Cross-shot Consistency (All)",
    "consistency_top10": "Cross-shot Consistency (Top-10)",
}
PNG_TEXT_KEY = "storymem"
REPORT_FILE = "report.md"
METRICS_CHART = "metrics.png"
STORIES_CHART = "stories.png"
HEATMAP_DIR = "consistency"


def format_number(value) -> str:
    """4 decimals as in the paper; '-' for a missing (NaN) value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.4f}"


def table1_markdown(summary_rows: Sequence[dict], include_paper: bool = False) -> str:
    """The Table-1-shaped summary as a Markdown table: one row per method."""
    header = ["Method", *[TABLE1_HEADERS[c] for c in TABLE1_COLUMNS], "Stories"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary_rows:
        cells = [str(row["method"]), *[format_number(row.get(c)) for c in TABLE1_COLUMNS],
                 str(row.get("num_stories", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    if include_paper:
        for name, values in PAPER_TABLE1.items():
            lines.append("| " + " | ".join([name, *[format_number(v) for v in values], "30"]) + " |")
    return "\n".join(lines)


def table1_text(summary_rows: Sequence[dict]) -> str:
    """The summary as aligned plain text, for the terminal."""
    header = ["method", *TABLE1_COLUMNS, "stories"]
    body = [[str(r["method"]), *[format_number(r.get(c)) for c in TABLE1_COLUMNS],
             str(r.get("num_stories", ""))] for r in summary_rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# charts


def _png_bytes(figure, numbers: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100,
                   metadata={PNG_TEXT_KEY: json.dumps(numbers, sort_keys=True)})
    return buffer.getvalue()


def read_png_numbers(data: bytes) -> dict:
    """The numbers a chart was drawn from (its "storymem" PNG text chunk)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[PNG_TEXT_KEY])


def _finite_or_none(value) -> float | None:
    """A chart value as a float; None for a missing or NaN one (plotted as 0)."""
    return None if value is None or math.isnan(value) else float(value)


def metrics_chart(summary_rows: Sequence[dict]) -> bytes:
    """Grouped bars: the five Table-1 metrics, one bar per method, values on the bars."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5))
    axes = figure.add_subplot()
    methods = [str(r["method"]) for r in summary_rows]
    x = np.arange(len(TABLE1_COLUMNS))
    width = 0.8 / max(1, len(methods))
    numbers = {}
    for i, row in enumerate(summary_rows):
        values = [row.get(c) for c in TABLE1_COLUMNS]
        finite = [_finite_or_none(v) for v in values]
        plotted = [0.0 if v is None else v for v in finite]
        bars = axes.bar(x + (i - (len(methods) - 1) / 2) * width, plotted, width,
                        label=methods[i])
        for bar, value in zip(bars, values):
            axes.annotate(format_number(value), (bar.get_x() + bar.get_width() / 2,
                                                  bar.get_height()),
                          ha="center", va="bottom", fontsize=7)
        numbers[methods[i]] = dict(zip(TABLE1_COLUMNS, finite))
    axes.set_xticks(x, [TABLE1_HEADERS[c].replace(" (", "\n(") for c in TABLE1_COLUMNS],
                    fontsize=8)
    axes.set_ylabel("score")
    axes.set_title("ST-Bench metrics (Table 1 columns)")
    if methods:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _png_bytes(figure, numbers)


def stories_chart(story_rows: Sequence[dict]) -> bytes:
    """Cross-shot consistency (all pairs) per story, one bar per method: flags outliers."""
    from matplotlib.figure import Figure

    rows = [r for r in story_rows if not r.get("error")]
    stories = sorted({r["story_id"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    figure = Figure(figsize=(max(6, 0.6 * len(stories) + 3), 4.5))
    axes = figure.add_subplot()
    x = np.arange(len(stories))
    width = 0.8 / max(1, len(methods))
    numbers: dict = {}
    for i, method in enumerate(methods):
        by_story = {r["story_id"]: r.get("consistency_all_pairs") for r in rows
                    if r["method"] == method}
        finite = [_finite_or_none(by_story.get(s)) for s in stories]
        plotted = [0.0 if v is None else v for v in finite]
        axes.bar(x + (i - (len(methods) - 1) / 2) * width, plotted, width, label=method)
        numbers[method] = dict(zip(stories, finite))
    axes.set_xticks(x, [s[:24] for s in stories], rotation=45, ha="right", fontsize=7)
    axes.set_ylabel("cross-shot consistency (all pairs)")
    axes.set_title("Consistency per story")
    if methods:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _png_bytes(figure, numbers)


def consistency_heatmap(matrix, labels: Sequence[str], title: str) -> bytes:
    """Shot-by-shot cosine similarity matrix with the values written in the cells."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, dtype=np.float64)
    size = max(4.0, 0.55 * len(labels) + 2.5)
    figure = Figure(figsize=(size, size * 0.85))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, vmin=min(0.0, float(matrix.min())) if matrix.size else 0.0,
                        vmax=1.0, cmap="viridis")
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if value < 0.6 else "black")
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return _png_bytes(figure, {"labels": list(labels), "matrix": matrix.round(6).tolist()})


def heatmap_key(story_id: str, method: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in method)
    return f"{HEATMAP_DIR}/{story_id}__{safe}.png"


# ---------------------------------------------------------------------------------------
# report


def write_report(report_uri: str, shot_rows: Sequence[dict], story_rows: Sequence[dict],
                 summary_rows: Sequence[dict], *, title: str = "ST-Bench evaluation",
                 notes: Sequence[str] = ()) -> dict[str, str]:
    """Write report.md and every chart under `report_uri`; returns {name: uri}."""
    written: dict[str, str] = {}

    def put(key: str, data: bytes) -> str:
        uri = storage.join(report_uri, key)
        storage.write_bytes(uri, data)
        written[key] = uri
        return key

    metrics_key = put(METRICS_CHART, metrics_chart(summary_rows))
    stories_key = put(STORIES_CHART, stories_chart(story_rows))
    heatmaps = []
    for row in story_rows:
        if row.get("error") or not row.get("num_shots"):
            continue
        shots = [r for r in shot_rows
                 if r["story_id"] == row["story_id"] and r["method"] == row["method"]]
        shots.sort(key=lambda r: r["shot_index"])
        matrix = np.asarray(row["consistency_matrix"], dtype=np.float64).reshape(
            row["num_shots"], row["num_shots"])
        labels = [f"{r['scene']}.{r['shot']}" for r in shots]
        key = put(heatmap_key(row["story_id"], row["method"]), consistency_heatmap(
            matrix, labels, f"{row.get('story_name') or row['story_id']} - {row['method']}"))
        heatmaps.append((row, key))

    lines = [f"# {title}", "", "## Summary (Table 1 columns)", "",
             table1_markdown(summary_rows), "",
             "For reference, the paper's numbers (real weights, 30 ST-Bench stories):", "",
             table1_markdown([], include_paper=True), "",
             f"![metrics]({metrics_key})", "", "## Stories", ""]
    header = ["Story", "Method", "Shots", *[TABLE1_HEADERS[c] for c in TABLE1_COLUMNS]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in story_rows:
        if row.get("error"):
            continue
        lines.append("| " + " | ".join([
            str(row.get("story_name") or row["story_id"]), str(row["method"]),
            str(row["num_shots"]), *[format_number(row.get(c)) for c in TABLE1_COLUMNS]]) + " |")
    lines += ["", f"![consistency per story]({stories_key})", ""]
    errors = [r for r in story_rows if r.get("error")]
    if errors:
        lines += ["## Not evaluated", ""]
        lines += [f"- `{r['story_id']}` ({r['method']}): {r['error']}" for r in errors]
        lines.append("")
    if heatmaps:
        lines += ["## Shot-by-shot consistency", ""]
        for row, key in heatmaps:
            lines += [f"### {row.get('story_name') or row['story_id']} - {row['method']}", "",
                      f"![{row['story_id']}]({key})", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    put(REPORT_FILE, "\n".join(lines).encode("utf-8"))
    return written
