"""ELBO-T2IAlign: training-free calibration of pixel-level text-image alignment in diffusion models."""

from elbo_t2ialign.cli import one_line_interrupt_at_startup
from elbo_t2ialign.core.compat import quiet_torchvision_fallback

# before torch, diffusers and transformers are imported (docs/reliability.md): Ctrl-C while they
# import prints one line in a command; transformers' torchvision fallback notice is not printed
one_line_interrupt_at_startup()
quiet_torchvision_fallback()

from elbo_t2ialign.core.aligner import Aligner, HeatmapResult  # noqa: E402
from elbo_t2ialign.core.options import AlignOptions  # noqa: E402

__all__ = ["Aligner", "AlignOptions", "HeatmapResult"]
__version__ = "0.1.0"
