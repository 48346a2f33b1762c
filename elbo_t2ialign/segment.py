"""Segmentation experiment (method.md §6): heatmaps for a dataset split into a resumable run folder.

    python -m elbo_t2ialign.segment model=sd15 dataset=voc dataset.split=val_100 elbo.strength=3
    python -m elbo_t2ialign.segment 'variants=[baseline,elbo,s2,s4,s5,fixed3,cross]'   # ablation, one pass
    python -m elbo_t2ialign.segment dataset=coco --shard 0/2          # one of two processes
    accelerate launch -m elbo_t2ialign.segment dataset=coco           # one process per GPU

Config: configs/segment.yaml; run-folder layout: elbo_t2ialign/segmentation/layout.py.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from elbo_t2ialign.cli import check_overrides, cli_errors, debug_requested, hydra_config_dir
from elbo_t2ialign.segmentation.config import SegmentationError
from elbo_t2ialign.segmentation.runner import run

DEBUG = False  # --debug or HYDRA_FULL_ERROR=1: tracebacks of expected errors too


@hydra.main(version_base="1.3", config_path=hydra_config_dir(), config_name="segment")
def main(cfg: DictConfig) -> None:
    cli_errors(lambda: run(cfg), (SegmentationError,), DEBUG)


def shard_flag_to_override(argv: list[str]) -> list[str]:
    """`--shard i/n` or `--shard=i/n` -> the Hydra override `shard=i/n`."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == "--shard":
            out.append(f"shard={next(args, '')}")
        elif arg.startswith("--shard="):
            out.append(f"shard={arg.split('=', 1)[1]}")
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    DEBUG, sys.argv = debug_requested(shard_flag_to_override(sys.argv))
    check_overrides("segment", sys.argv[1:], DEBUG)
    main()
