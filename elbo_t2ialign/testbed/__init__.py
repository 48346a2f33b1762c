"""The offline testbed: a synthetic shapes world and a tiny diffusion model trained on it.

- `world`: deterministic scenes (images, per-pixel ground truth, captions) and
  `python -m elbo_t2ialign.testbed.world` to write them in the real datasets' layout.
- `train`: `python -m elbo_t2ialign.testbed.train` trains the committed model
  (`model/`, a standard diffusers StableDiffusionPipeline folder).
- `measure`: `python -m elbo_t2ialign.testbed.measure` checks that the model uses
  its text (loss gap) and how well its attention segments.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
