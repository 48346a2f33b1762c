"""Device check: every tiny family on the accelerator (fp32 and fp16) against the CPU in fp32.

Catches tensors left on the wrong device, dtype mix-ups in the fp16 path and
kernel-dependent differences. Prints one JSON line per (family, dtype).
    python scripts/gpu_parity.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from elbo_t2ialign import Aligner
from elbo_t2ialign.devtools.tiny import BUILDERS

OPTS = {"elbo_timesteps": [1, 251, 501, 751], "collect_timesteps": [20, 100, 200]}


def maps(family: str, device: str, dtype: str):
    aligner = Aligner.from_pipeline(
        BUILDERS[family](), device=device, dtype=dtype, resolution=32, max_sequence_length=16, **OPTS
    )
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8))
    return aligner.heatmaps(image, ["cat", "dog", "bird"], seed=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    for family in BUILDERS:
        ref = maps(family, "cpu", "float32")
        for dtype in ("float32", "float16"):
            try:
                got = maps(family, args.device, dtype)
            except Exception as err:  # report and go on: one broken family must not hide the others
                print(json.dumps({"family": family, "dtype": dtype, "error": repr(err)[:300]}), flush=True)
                continue
            diff = max(
                float(np.abs(got.baseline_heatmaps[c] - ref.baseline_heatmaps[c]).max()) for c in ref.heatmaps
            )
            elbo = max(abs(got.losses[c] - ref.losses[c]) / abs(ref.losses[c]) for c in ref.losses)
            print(
                json.dumps(
                    {
                        "family": family,
                        "device": args.device,
                        "dtype": dtype,
                        "max_raw_map_diff": round(diff, 6),
                        "max_elbo_rel_diff": round(elbo, 6),
                        "tau_cpu": ref.tau,
                        "tau_dev": got.tau,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
