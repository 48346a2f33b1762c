#!/usr/bin/env bash
# Segmentation experiment over several datasets: heatmaps, then metrics.
# Copy this file, edit the block below, run it from anywhere:
#   bash scripts/template_run_segmentation.sh
# DATASETS, MODEL, SPLIT and OUT_ROOT may also come from the environment; an offline run on CPU
# with the bundled testbed model and the synthetic shapes world (generated when missing or stale):
#   DATASETS=shapes MODEL=shapes SPLIT=val_10 bash scripts/template_run_segmentation.sh
# Each dataset gets one run folder holding both the calibrated (ELBO) and the
# baseline maps; rerunning resumes it. Results: <run folder>/metrics.md. For a grid of models x
# datasets with a plan, time estimates and one cross-run table: python -m elbo_t2ialign.grid (configs/grid/).
set -euo pipefail

# ---- edit here -------------------------------------------------------------
read -r -a DATASETS <<< "${DATASETS:-voc context coco ade20k aep}"   # any of: voc context coco ade20k aep shapes
MODEL=${MODEL:-sd15}                     # a file in configs/model/
SPLIT=${SPLIT:-val_100}                  # val | val_100 | val_10_car (ADE20K and AEP have only val)
SEG_ARGS=(elbo.strength=3 seed=0)        # more Hydra overrides, e.g. dataset.phrase_path=... on_error=stop
                                         # or the ablation in the same pass: 'variants=[baseline,elbo,s2,s4,s5,fixed3,cross]'
EVAL_ARGS=()                             # e.g. (--threshold 0.4) or (--crf)
TAG=strength3                            # names this setting's run folders; change it with SEG_ARGS
OUT_ROOT=${OUT_ROOT:-runs/segment}                   # run folders: $OUT_ROOT/$MODEL/<dataset>-<split>-$TAG
# ---------------------------------------------------------------------------

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

# The least-loaded GPU (most free memory) when nvidia-smi works; CPU otherwise.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=$(nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits | sort -t, -k2 -nr | head -n1 | cut -d, -f1)
  export CUDA_VISIBLE_DEVICES=$GPU
  DEVICE=cuda
  echo "using GPU $GPU"
else
  DEVICE=cpu
  echo "no GPU found: running on CPU (slow for real models)"
fi

for DS in "${DATASETS[@]}"; do
  if [ "$DS" = shapes ]; then   # the synthetic world: generated (when missing or stale), never downloaded
    "$PYTHON" -m elbo_t2ialign.testbed.world --ensure
  fi
  meta=elbo_t2ialign/segmentation/metadata/$DS
  [ -d "$meta" ] || meta=datasets/$DS         # a generated dataset keeps its split lists with its data
  split=$SPLIT
  head=${split%%_*}; tail=${split#"$head"}
  if [ ! -f "$meta/${head}_id${tail}.txt" ]; then
    echo "$DS has no split $split: using val"
    split=val
  fi
  RUN_DIR=$OUT_ROOT/$MODEL/$DS-$split${TAG:+-$TAG}
  echo "== $DS ($split) -> $RUN_DIR"
  MODEL_ARGS=()
  [ "$MODEL" = shapes ] && MODEL_ARGS=(elbo=shapes)   # the testbed model refines from its 16x16 stage
  "$PYTHON" -m elbo_t2ialign.segment model="$MODEL" dataset="$DS" dataset.split="$split" \
    device="$DEVICE" output_dir="$RUN_DIR" "${MODEL_ARGS[@]}" "${SEG_ARGS[@]}"
  "$PYTHON" -m elbo_t2ialign.evaluate "$RUN_DIR" "${EVAL_ARGS[@]}"
done
