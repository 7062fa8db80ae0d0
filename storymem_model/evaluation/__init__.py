"""Evaluation: the StoryMem paper's ST-Bench metrics on committed story renders.

Modules, each importing only the ones listed before it:

* `metrics`: the metric math, pure functions on embeddings and scores (no model);
* `video_encoders`: ViCLIP and the CLIP frame average (`VideoTextEncoder` protocol);
* `encoder_spec`: which encoders to use, as frozen specs (built once at the edge);
* `encoder_factory`: the one place those specs become loaded encoders (`Encoders`);
* `rows`: `EvalRow`, the typed row of eval.parquet (schema derived from it);
* `renders`: committed story renders in an output folder, method labels;
* `story_eval`: one story render scored (shot rows and a story row);
* `charts`, `report`: PNG charts carrying their numbers, report.md and the summary table;
* `benchmark`: a whole output folder evaluated and written (`evaluate_output`).

The metrics and their sources are described in docs/evaluation.md and
docs/method.md#st-bench-and-its-metrics. Nothing is imported here, so importing one module
never loads torch for another.
"""
