"""Models built in code, offline, with random weights: the `tiny:<family>` pipelines, the tiny
CLIP scorer and BLIP captioner (model ids "tiny", "tiny-shapes"), and the offline tokenizers they
use (`tokenizers.py`, also the testbed model's). Smoke runs and tests; their outputs mean nothing.
Imports nothing else of the package."""
