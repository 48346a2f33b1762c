"""Segmentation experiment: datasets, the resumable runner, the evaluator.

`run(cfg, aligner=None)` writes a run folder (layout in `layout.py`);
`evaluate(run_dir)` reads it and writes metrics.json, metrics.md and plots.
"""

from .config import ConfigError, InputError, SegmentationError
from .datasets import SegDataset
from .evaluate import evaluate
from .runner import run

__all__ = ["ConfigError", "InputError", "SegDataset", "SegmentationError", "evaluate", "run"]
