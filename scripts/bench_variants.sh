#!/usr/bin/env bash
# What the ablation variants cost: the shapes val split with the bundled testbed model, segmented
# with the default 2 variants and with 7 (strengths 1-5, fixed tau 3, unrefined cross-attention),
# alternating, each into a new run folder, then each folder evaluated. Prints one line per step.
#   bash scripts/bench_variants.sh                    # 300 images, 1 repeat
#   IMAGES=60 REPEATS=2 bash scripts/bench_variants.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
IMAGES=${IMAGES:-300}
REPEATS=${REPEATS:-1}
OUT=${OUT:-runs/bench_variants/$(date +%Y%m%d-%H%M%S)}   # a new folder: a resumed run would compute nothing
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$OUT"
"$PY" -c "from elbo_t2ialign.testbed import world; world.ensure_dataset('datasets/shapes')"
declare -A SETS=([2]="[baseline,elbo]" [7]="[baseline,elbo,s2,s4,s5,fixed3,cross]")
for r in $(seq "$REPEATS"); do
  for n in 2 7; do
    dir="$OUT/r$r-variants$n"
    t0=$EPOCHREALTIME
    "$PY" -m elbo_t2ialign.segment model=shapes dataset=shapes elbo=shapes device=cpu progress=false \
      num_images="$IMAGES" "variants=${SETS[$n]}" output_dir="$dir" > "$dir.segment.out" 2>&1
    t1=$EPOCHREALTIME
    "$PY" -m elbo_t2ialign.evaluate "$dir" --no-progress --overlays 4 > "$dir.evaluate.out" 2>&1
    t2=$EPOCHREALTIME
    awk -v r="$r" -v n="$n" -v i="$IMAGES" -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {
      printf "repeat %s, %s variants, %s images: segment %.1f s, evaluate %.1f s\n", r, n, i, b - a, c - b }'
  done
done
