"""ELBO-T2IAlign: training-free calibration of pixel-level text-image alignment in diffusion models."""

from .aligner import Aligner, HeatmapResult
from .options import AlignOptions

__all__ = ["Aligner", "AlignOptions", "HeatmapResult"]
__version__ = "0.1.0"
