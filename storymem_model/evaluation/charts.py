"""The evaluation's PNG charts, each carrying the numbers it shows.

* `metrics_chart`: the five Table 1 metrics, one bar per method, values on the bars;
* `stories_chart`: cross-shot consistency (all pairs) per story and method;
* `consistency_heatmap`: one story's shot-by-shot similarity matrix.

Charts are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend). Every PNG stores the numbers it was drawn from as JSON in its "storymem" text
chunk (`read_png_numbers`), so a reader or a test can check a chart against the table
without reading pixels. A missing (NaN) value is drawn as 0 and stored as null.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence

import numpy as np

from storymem_model.evaluation.metrics import TABLE1_COLUMNS, TABLE1_HEADERS, format_number
from storymem_model.evaluation.rows import EvalRow

PNG_TEXT_KEY = "storymem"
HEATMAP_DIR = "consistency"


def read_png_numbers(data: bytes) -> dict:
    """The numbers a chart was drawn from (its "storymem" PNG text chunk)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[PNG_TEXT_KEY])


def heatmap_key(story_id: str, method: str) -> str:
    """Where a story's heatmap goes inside the report folder."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in method)
    return f"{HEATMAP_DIR}/{story_id}__{safe}.png"


def _png_bytes(figure, numbers: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100,
                   metadata={PNG_TEXT_KEY: json.dumps(numbers, sort_keys=True)})
    return buffer.getvalue()


def _finite_or_none(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def metrics_chart(summary_rows: Sequence[EvalRow]) -> bytes:
    """Grouped bars: the five Table 1 metrics, one bar per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5))
    axes = figure.add_subplot()
    methods = [str(r.method) for r in summary_rows]
    x = np.arange(len(TABLE1_COLUMNS))
    width = 0.8 / max(1, len(methods))
    numbers = {}
    for i, row in enumerate(summary_rows):
        values = [row.metric(c) for c in TABLE1_COLUMNS]
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


def stories_chart(story_rows: Sequence[EvalRow]) -> bytes:
    """Cross-shot consistency (all pairs) per story, one bar per method: shows outliers."""
    from matplotlib.figure import Figure

    rows = [r for r in story_rows if not r.error]
    stories = sorted({r.story_id for r in rows})
    methods = sorted({r.method for r in rows})
    figure = Figure(figsize=(max(6, 0.6 * len(stories) + 3), 4.5))
    axes = figure.add_subplot()
    x = np.arange(len(stories))
    width = 0.8 / max(1, len(methods))
    numbers: dict = {}
    for i, method in enumerate(methods):
        by_story = {r.story_id: r.consistency_all_pairs for r in rows if r.method == method}
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
