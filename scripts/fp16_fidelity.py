"""How far half precision moves the maps from float32, for this project and a reference-style path.

Builds a random-weight pipeline with the full architecture (the bench builder, attention sharpened
so that maps are not flat), computes the maps of a few images in float32, then in half precision
twice: with this project's capture (scores, softmax and head mean in float32: the default) and with
the reference's (all of it in the network's dtype: `capture_precision=model`). Prints one JSON line
per (path, image) and a summary: max and mean absolute map difference and correlation with the
float32 maps, and the largest tau difference.

    python scripts/fp16_fidelity.py --model sd15 --resolution 512 --device cuda      # GPU check
    python scripts/fp16_fidelity.py --model tiny-sd --device cpu --dtype bfloat16    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from elbo_t2ialign import Aligner
from elbo_t2ialign.devtools.bench import bench_image, build_pipeline, image_classes

PATHS = {"project": "float32", "reference_style": "model"}  # name -> capture_precision


def run_maps(aligner: Aligner, images: int, classes: int, resolution: int, **overrides):
    out = []
    for i in range(images):
        res = aligner.heatmaps(bench_image(i, resolution), image_classes(i, classes), seed=i, **overrides)
        out.append(res)
    return out


def compare(got, ref) -> dict[str, float]:
    a = np.concatenate(
        [np.ravel(m) for r in got for m in (*r.heatmaps.values(), *r.baseline_heatmaps.values())]
    )
    b = np.concatenate(
        [np.ravel(m) for r in ref for m in (*r.heatmaps.values(), *r.baseline_heatmaps.values())]
    )
    tau = max(abs(g.tau[c] - f.tau[c]) for g, f in zip(got, ref, strict=True) for c in f.tau)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_abs_diff": float(np.abs(a - b).mean()),
        "correlation": float(np.corrcoef(a, b)[0, 1]),
        "max_tau_diff": float(tau),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--resolution", type=int, default=512, help="model resolution (tiny models: 32)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--classes", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda but CUDA is not available here; use --device cpu with a tiny model"
        )
    resolution = 32 if args.model.startswith("tiny-") else args.resolution
    pipe, _ = build_pipeline(args.model, device)
    common = {"device": device, "resolution": resolution, "max_sequence_length": 16}
    t0 = time.perf_counter()
    ref = run_maps(
        Aligner.from_pipeline(pipe, dtype="float32", **common), args.images, args.classes, resolution
    )
    half = Aligner.from_pipeline(pipe, dtype=args.dtype, **common)  # casts the networks in place
    summary = {}
    for name, precision in PATHS.items():
        got = run_maps(half, args.images, args.classes, resolution, capture_precision=precision)
        summary[name] = compare(got, ref)
        print(
            json.dumps(
                {
                    "path": name,
                    "capture_precision": precision,
                    "model": args.model,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": args.dtype,
                    "resolution": resolution,
                    "images": args.images,
                    "classes": args.classes,
                    **{k: round(v, 6) for k, v in summary[name].items()},
                }
            ),
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
