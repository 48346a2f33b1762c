"""Resident memory of a segmentation run over its images: does it stay flat?

Runs `python -m elbo_t2ialign.demo` in this process (by default the whole 300-image shapes `val`
split with the bundled testbed model, into a fresh temporary folder, so every image is computed)
while a thread reads the process's resident set size (VmRSS of /proc/self/status, Linux) every
`--every` seconds together with the number of finished images. Prints the RSS at every
`--step`-th finished image, the growth from the first step to the last, a least-squares slope in
MB per 100 images over the images after the first step, the RSS during the evaluation that follows
and the peak (VmHWM).

    python scripts/memory_over_run.py                      # the 300-image demo split (~5 min on 2 CPUs)
    python scripts/memory_over_run.py --images 40 --step 5 # a quick look
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def finished(maps: Path) -> int:
    if not maps.is_dir():
        return 0
    return sum(1 for p in maps.iterdir() if not p.name.startswith(".") and (p / "scores.json").is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=None, help="only the first N images")
    parser.add_argument("--step", type=int, default=25, help="print the RSS every this many images")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between two samples")
    args = parser.parse_args()

    from elbo_t2ialign import demo

    samples: list[tuple[float, int, float]] = []  # (time, finished images, RSS MB)
    with tempfile.TemporaryDirectory(prefix="rss-") as out:
        maps = Path(out) / f"shapes-{args.split}" / "maps"
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.time(), finished(maps), status_mb("VmRSS")))
                stop.wait(args.every)

        thread = threading.Thread(target=sample, daemon=True)
        start = time.time()
        thread.start()
        demo.main(
            ["--split", args.split, "--out", out, *(["--images", str(args.images)] if args.images else [])]
        )
        stop.set()
        thread.join()
    took = time.time() - start

    total = max(n for _, n, _ in samples)
    # RSS when n images were finished: the last sample before the (n+1)-th was done; for the last
    # image, the first sample after it (then the evaluation starts, whose peak is shown apart)
    at: dict[int, float] = {}
    for _, n, rss in samples:
        if n < total or n not in at:
            at[n] = rss
    evaluation = max(rss for _, n, rss in samples if n == total)
    steps = [n for n in range(args.step, total + 1, args.step) if n in at]
    print(f"\nRSS of a segmentation run of shapes/{args.split}, {total} images, {took:.0f} s:")
    print("| images finished | RSS MB |")
    print("| ---: | ---: |")
    for n in [0, *steps]:
        if n in at:
            print(f"| {n} | {at[n]:.1f} |")
    during = [(n, rss) for _, n, rss in samples if steps and steps[0] <= n < total]
    if len(during) > 2:
        x, y = np.array([a[0] for a in during], float), np.array([a[1] for a in during], float)
        slope = np.polyfit(x, y, 1)[0] * 100
        print(f"growth from image {steps[0]} to {steps[-1]}: {at[steps[-1]] - at[steps[0]]:+.1f} MB")
        print(f"least-squares slope over images {steps[0]}..{total - 1}: {slope:+.2f} MB per 100 images")
    print(f"during the evaluation that follows: up to {evaluation:.1f} MB")
    print(f"peak RSS (VmHWM): {status_mb('VmHWM'):.1f} MB")


if __name__ == "__main__":
    main()
