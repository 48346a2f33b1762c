#!/usr/bin/env bash
# Run on the CPU machine before scripts/bench_gpu.sh goes to a GPU machine whose Python lacks the
# project's locked diffusers/transformers (requirements/current.txt; it cannot download): saves their pure-Python wheels to
# .whl/ (git-ignored), which bench_gpu.sh installs into /tmp/site when it finds them.
# Carry the folder with the run: carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" requirements/current.txt; }
PIP="${PIP:-python3 -m pip}"
# importlib_metadata: a diffusers requirement missing from the GPU image; regex: transformers needs
# >=2025.10.22, which the image may predate (both at the CPU venv's versions; the image's Python is 3.12)
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$(pin diffusers)" "$(pin transformers)" importlib_metadata==10.2.0 regex==2026.11.19
ls -l .whl
