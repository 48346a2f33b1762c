"""The main job (`make demo`): segment the held-out shapes split with the bundled testbed model,
evaluate with and without the ELBO calibration and the ablation over calibration strengths 1-5,
a fixed temperature and the unrefined cross-attention (all from one network pass per image), print
the numbers and where the report is.

Offline and on a CPU: the shapes world is generated into `datasets/shapes` when missing (seconds),
the model is the one committed in `elbo_t2ialign/testbed/model`. The run folder resumes like any
segmentation run, so a second `make demo` only re-evaluates; a retrained model is refused there (identity.json).

    python -m elbo_t2ialign.demo [--split val] [--images N] [overrides ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from elbo_t2ialign.cli import cli_errors, compose_config, debug_requested
from elbo_t2ialign.segmentation import ablation, evaluate, run
from elbo_t2ialign.segmentation.config import ConfigError, SegmentationError

MODEL = Path(__file__).resolve().parent / "testbed" / "model"  # the bundled testbed model
# elbo = strength 3 (configs/elbo/shapes.yaml), so strengths 1-5, fixed tau 3 and the unrefined map
VARIANTS = "variants=[baseline,elbo,s2,s4,s5,fixed3,cross]"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="val", help="val (300 images), val_rare, val_occlusion, val_100")
    parser.add_argument("--images", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--datasets-dir", default="datasets")
    parser.add_argument("--out", default="runs/demo", help="run folders go under here")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. elbo.strength=2")
    args = parser.parse_args(argv)

    out = Path(args.out) / f"shapes-{args.split}"
    overrides = [
        # elbo=shapes: the method's defaults, refinement from this model's 16x16 self-attention
        "model=shapes",
        "dataset=shapes",
        "elbo=shapes",
        f"dataset.split={args.split}",
        f"datasets_dir={args.datasets_dir}",
        f"output_dir={out}",
        "device=cpu",
        VARIANTS,
        *([f"num_images={args.images}"] if args.images else []),
        *args.overrides,
    ]
    cfg = compose_config("segment", overrides, ConfigError)  # a bad override: before anything is written
    # the world's own command (the package's modules do not import the testbed): writes it when missing
    command = [sys.executable, "-m", "elbo_t2ialign.testbed.world", "--ensure"]
    subprocess.run([*command, "--out", str(Path(args.datasets_dir) / "shapes")], check=True)
    start = time.time()
    run(cfg)
    metrics = evaluate(out, overlays=4)
    took = time.time() - start

    elbo, base = metrics["elbo"], metrics["baseline"]
    print(f"\nshapes/{args.split} with the bundled testbed model ({took:.0f} s):")
    print(f"  mIoU with ELBO calibration:    {elbo['mIoU']:.1f}  (threshold {elbo['threshold']:.2f})")
    print(f"  mIoU without (strength 1):     {base['mIoU']:.1f}  (threshold {base['threshold']:.2f})")
    print(f"  delta:                         {elbo['mIoU'] - base['mIoU']:+.1f}")
    print("", *ablation.markdown(metrics)[:-3], sep="\n")
    print(f"report: {out / 'metrics.md'}, plots in {out / 'plots'}")
    return metrics


if __name__ == "__main__":
    debug, args = debug_requested(sys.argv[1:])
    cli_errors(lambda: main(args), (SegmentationError,), debug)
