"""Generation experiment (method.md §7): ELBO-weighted and baseline images into a resumable run folder.

    python -m elbo_t2ialign.generate model=sd15 prompts=ane
    python -m elbo_t2ialign.generate model=sd3 prompts=dvmp num_prompts=100 images_per_prompt=4
    python -m elbo_t2ialign.generate model.id=tiny:sd model.name=tiny_sd prompts=demo steps=4  # offline
    python -m elbo_t2ialign.generation.evaluate runs/generate/sd15/ane/strength-1.2          # CLIP score

Config: configs/generate.yaml; run-folder layout: elbo_t2ialign/generation/layout.py.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from elbo_t2ialign.cli import check_overrides, cli_errors, debug_requested, hydra_config_dir
from elbo_t2ialign.generation.config import GenerationError
from elbo_t2ialign.generation.phrases import PhraseError
from elbo_t2ialign.generation.runner import run

DEBUG = False  # --debug or HYDRA_FULL_ERROR=1: tracebacks of expected errors too


@hydra.main(version_base="1.3", config_path=hydra_config_dir(), config_name="generate")
def main(cfg: DictConfig) -> None:
    cli_errors(lambda: run(cfg), (GenerationError, PhraseError), DEBUG)


if __name__ == "__main__":
    DEBUG, sys.argv = debug_requested(sys.argv)
    check_overrides("generate", sys.argv[1:], DEBUG)
    main()
