#!/usr/bin/env bash
# GPU benchmark in one call (H100/H200, ~4-5 minutes expected, hard cap 7.5 minutes):
#   1. SD1.5 at 512 px fp16, optimized vs reference (--compare), 2 images of 2 classes;
#   2. SD1.5 at 512 px fp16, images/s of 1 vs 2 shard processes on the same GPU;
#   3. SDXL and SD3-medium at 1024 px fp16, optimized mode, 2 images of 2 classes.
# Random weights with the published architectures, built directly on the GPU (no download).
# One JSON line per step, appended to $OUT/bench.jsonl (or ./bench_gpu.jsonl without $OUT).
# A step that fails or runs past its limit leaves a {"step": ..., "failed": ...} line and the
# next step still runs.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DEVICE="${BENCH_DEVICE:-cuda}"
DTYPE="${BENCH_DTYPE:-float16}"
STEPS="${BENCH_STEPS:-sd15-compare sd15-processes sdxl sd3}"  # a subset for a quick try
LOG="${OUT:-.}/bench.jsonl"
[ -n "${OUT:-}" ] || LOG=./bench_gpu.jsonl
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

step() {  # step NAME SECONDS ARGS...
  local name="$1" limit="$2"; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local started=$SECONDS out rc line
  out=$(mktemp)
  timeout --kill-after=10 "$limit" "$PY" -m elbo_t2ialign.bench --device "$DEVICE" --dtype "$DTYPE" "$@" \
    > "$out" 2> >(grep -v -e torchvision -e '^$' >&2)
  rc=$?
  line=$(grep '^{' "$out" | tail -n 1)
  rm -f "$out"
  if [ "$rc" = 0 ] && [ -n "$line" ]; then
    echo "{\"step\": \"$name\", \"wall_s\": $((SECONDS - started)), \"result\": $line}" | tee -a "$LOG"
  else
    echo "{\"step\": \"$name\", \"failed\": \"exit $rc after $((SECONDS - started)) s\"}" | tee -a "$LOG"
  fi
}

RES15="${BENCH_RES_SD15:-512}"
RESXL="${BENCH_RES_XL:-1024}"
step sd15-compare 150 --model sd15 --resolution "$RES15" --images 2 --classes 2 --compare
step sd15-processes 90 --model sd15 --resolution "$RES15" --images 8 --classes 2 --processes 2
step sdxl 100 --model sdxl --resolution "$RESXL" --images 2 --classes 2
step sd3 100 --model sd3 --resolution "$RESXL" --images 2 --classes 2
echo "wrote $LOG"
