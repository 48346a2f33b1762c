"""Segmentation experiment: datasets, the resumable runner, the evaluator.

`run(cfg, aligner=None)` writes a run folder (layout in `layout.py`);
`evaluate(run_dir)` reads it and writes metrics.json, metrics.md and plots.
"""

from elbo_t2ialign.segmentation.config import ConfigError, InputError, SegmentationError
from elbo_t2ialign.segmentation.datasets import SegDataset
from elbo_t2ialign.segmentation.evaluate import evaluate
from elbo_t2ialign.segmentation.runner import run

__all__ = ["ConfigError", "InputError", "SegDataset", "SegmentationError", "evaluate", "run"]
