#!/usr/bin/env bash
# GPU throughput table of issue 16 in one call (one H100/H200; ~4-5 minutes expected, every step
# capped so that the whole run stays under 8 minutes). fp16, random weights, published architectures
# built directly on the GPU (no download). Each step is one bench process: the optimized run
# (s/image, peak GPU MB, overhead, breakdown), the same images again without the timers'
# synchronisations (s/image unsynced: what a dataset run gets), then the floor: the same network
# samples replayed without capture at each floor batch, the fastest reported.
#   sd15-k2, sd15-k4  SD1.5 at 512 px, 2 and 4 classes, 4 images, floor at batch 8 16 32
#   sdxl, sd3         SDXL and SD3-medium at 1024 px, 2 classes, 2 images, floor at batch 4 8 16
#   sd15-compare      SD1.5 at 512 px, 2 classes: optimized vs the reference mode (speedup, max abs diff)
# Execution settings, each against sd15-k2's maps (max abs diff vs plain run), floor at batch 8:
#   sd15-k2-channels-last, sd15-k2-capture-fp16 (capture_precision=model)
#   sd15-k2-compile   torch.compile (inductor, mode default) of the uncaptured forwards: compiling
#                     takes minutes, so within the 470 s budget it is skipped after the table's steps;
#                     run it alone: BENCH_STEPS="sd15-k2 sd15-k2-compile" scripts/bench_gpu.sh
# One JSON record per step goes to a new file $OUT/bench_gpu_<time>.jsonl (./ without $OUT); at the
# end the tables are printed from it (python -m elbo_t2ialign.devtools.bench --table FILE). A failed or
# timed-out step leaves a {"step", "failed"} record and the next step still runs.
#
#   scripts/bench_gpu.sh            needs CUDA: stops at once with a message where there is none
#   scripts/bench_gpu.sh --dry-run  CPU smoke test of the script itself: tiny models, 32 px, fp32
# Environment: PYTHON (default python3), BENCH_STEPS (a subset of the steps, in this order),
# BENCH_DEVICE (cuda).
# Wheels in .whl/ (scripts/gpu_wheels.sh) are installed to /tmp/site first when diffusers is missing.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "bench_gpu.sh: unknown argument '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
BUDGET_S=470  # under 8 minutes in all: a step that could pass it is skipped

if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "bench_gpu.sh: installing the wheels in .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$DRY" = 1 ]; then
  DEVICE=cpu DTYPE=float32 RES15=32 RESXL=32 IMGS15=1 IMGSXL=1 FLOOR15="4 8" FLOORXL="4 8" FLOORV=4 BACKEND=eager
  model() { echo "tiny-$1" | sed 's/tiny-sd15/tiny-sd/'; }
else
  DEVICE="${BENCH_DEVICE:-cuda}" DTYPE=float16 RES15=512 RESXL=1024 IMGS15=4 IMGSXL=2 FLOOR15="8 16 32" FLOORXL="4 8 16"
  FLOORV=8 BACKEND=inductor
  model() { echo "$1"; }
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench_gpu.sh: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or use --dry-run for a CPU smoke test" >&2
    exit 2
  fi
fi
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
  || { echo "bench_gpu.sh: torch/diffusers/transformers do not import; run scripts/gpu_wheels.sh here and carry .whl" >&2; exit 2; }
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

LOG="${OUT:-.}/bench_gpu_$(date -u +%Y%m%d-%H%M%S).jsonl"
STEPS="${BENCH_STEPS:-sd15-k2 sd15-k2-channels-last sd15-k2-capture-fp16 sd15-k4 sdxl sd3 sd15-compare sd15-k2-compile}"
MAPS=$(mktemp -d)  # sd15-k2's maps, which the settings steps are compared with
trap 'rm -rf "$MAPS"' EXIT

step() {  # step NAME SECONDS ARGS...
  local name="$1" limit="$2"; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  if [ $((SECONDS + limit)) -gt "$BUDGET_S" ]; then
    echo "{\"step\": \"$name\", \"failed\": \"skipped: its ${limit} s cap would pass the ${BUDGET_S} s budget\"}" | tee -a "$LOG"
    return 0
  fi
  local started=$SECONDS out rc line
  out=$(mktemp)
  timeout --kill-after=10 "$limit" "$PY" -m elbo_t2ialign.devtools.bench --device "$DEVICE" --dtype "$DTYPE" "$@" \
    > "$out" 2> >(grep -v -e torchvision -e '^$' >&2)
  rc=$?
  line=$(grep '^{' "$out" | tail -n 1)
  rm -f "$out"
  if [ "$rc" = 0 ] && [ -n "$line" ]; then
    echo "{\"step\": \"$name\", \"wall_s\": $((SECONDS - started)), \"result\": $line}" >> "$LOG"
    echo "step $name: done in $((SECONDS - started)) s"
  else
    echo "{\"step\": \"$name\", \"failed\": \"exit $rc after $((SECONDS - started)) s\"}" | tee -a "$LOG"
  fi
}

variant() {  # variant NAME SECONDS ARGS...: sd15-k2's images with other execution settings
  local name="$1" limit="$2"; shift 2
  local against=()
  [ -f "$MAPS/sd15-k2.npz" ] && against=(--maps-against "$MAPS/sd15-k2.npz")
  step "$name" "$limit" --model "$(model sd15)" --resolution "$RES15" --images "$IMGS15" --classes 2 \
    --floor-batches "$FLOORV" "${against[@]}" "$@"
}

# shellcheck disable=SC2086  # the floor batch lists are split on purpose
{
  step sd15-k2 60 --model "$(model sd15)" --resolution "$RES15" --images "$IMGS15" --classes 2 --unsynced --floor-batches $FLOOR15 \
    --maps-out "$MAPS/sd15-k2.npz"
  variant sd15-k2-channels-last 45 --channels-last
  variant sd15-k2-capture-fp16 45 --capture-precision model
  step sd15-k4 75 --model "$(model sd15)" --resolution "$RES15" --images "$IMGS15" --classes 4 --unsynced --floor-batches $FLOOR15
  step sdxl 95 --model "$(model sdxl)" --resolution "$RESXL" --images "$IMGSXL" --classes 2 --unsynced --floor-batches $FLOORXL
  step sd3 125 --model "$(model sd3)" --resolution "$RESXL" --images "$IMGSXL" --classes 2 --unsynced --floor-batches $FLOORXL
  step sd15-compare 90 --model "$(model sd15)" --resolution "$RES15" --images 2 --classes 2 --compare
  variant sd15-k2-compile 240 --compile default --compile-backend "$BACKEND"
}
echo
echo "$(date -u +%FT%TZ), $SECONDS s in all, records in $LOG"
[ -s "$LOG" ] && "$PY" -m elbo_t2ialign.devtools.bench --table "$LOG"
