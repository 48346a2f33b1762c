"""Evaluate a segmentation run folder: `python -m elbo_t2ialign.evaluate <run_dir> [--threshold T] [--crf]`.

Writes metrics.json, metrics.md and plots/ (see elbo_t2ialign/segmentation/evaluate.py).
"""

import sys

from elbo_t2ialign.segmentation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
