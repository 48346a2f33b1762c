"""ELBO-T2IAlign: training-free calibration of pixel-level text-image alignment in diffusion models."""

from elbo_t2ialign.core.aligner import Aligner, HeatmapResult
from elbo_t2ialign.core.options import AlignOptions

__all__ = ["Aligner", "AlignOptions", "HeatmapResult"]
__version__ = "0.1.0"
