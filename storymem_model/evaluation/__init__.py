"""Evaluation: the paper's ST-Bench metrics on committed renders (metrics, video-text
encoders, per-story and benchmark evaluation, report and charts)."""
