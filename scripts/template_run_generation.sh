#!/usr/bin/env bash
# Generation experiment over several prompt sets: ELBO-weighted + baseline images, then CLIP scores.
# Copy this file, edit the block below, run it from anywhere:
#   bash scripts/template_run_generation.sh
# Each prompt set gets one run folder holding the weighted images, their per-step phrase weights and
# the unweighted images from the same seeds; rerunning resumes it. Results: <run folder>/clip_scores.md.
# MODEL, PROMPT_SETS and OUT_ROOT may also come from the environment; an offline smoke test on CPU
# (random tiny model, bundled prompts, noise images):
#   MODEL=tiny_sd PROMPT_SETS=demo bash scripts/template_run_generation.sh
set -euo pipefail

# ---- edit here -------------------------------------------------------------
read -r -a PROMPT_SETS <<< "${PROMPT_SETS:-ane dvmp abc6k}"   # any of: ane dvmp abc6k demo (configs/prompts/)
MODEL=${MODEL:-sd15}               # a file in configs/model/, or tiny_sd / tiny_sdxl / tiny_sd3 (random, offline)
GEN_ARGS=(strength=1.2 num_prompts=1000 images_per_prompt=1 seed=4307)   # more Hydra overrides, e.g. steps=50 guidance=7.5
CLIP_MODEL=openai/clip-vit-base-patch32   # hub id or local folder; tiny models use a tiny CLIP
EVAL_ARGS=(--grid 4)               # e.g. (--batch-size 64 --truncate)
TAG=strength1.2                    # names this setting's run folders; change it with GEN_ARGS
OUT_ROOT=${OUT_ROOT:-runs/generate}  # run folders: $OUT_ROOT/$MODEL/<prompt set>-$TAG
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

case $MODEL in
  tiny_*)  # a random tiny pipeline built in code: exercises the whole path, images are noise
    family=${MODEL#tiny_}
    MODEL_ARGS=(model="sd15" model.name="$MODEL" model.id="tiny:$family" model.resolution=null
                model.max_sequence_length=16 steps=4)
    CLIP_MODEL=tiny ;;
  *) MODEL_ARGS=(model="$MODEL") ;;
esac

for SET in "${PROMPT_SETS[@]}"; do
  RUN_DIR=$OUT_ROOT/$MODEL/$SET${TAG:+-$TAG}
  echo "== $SET -> $RUN_DIR"
  "$PYTHON" -m elbo_t2ialign.generate "${MODEL_ARGS[@]}" prompts="$SET" device="$DEVICE" \
    output_dir="$RUN_DIR" "${GEN_ARGS[@]}"
  "$PYTHON" -m elbo_t2ialign.generation.evaluate "$RUN_DIR" --clip "$CLIP_MODEL" --device "$DEVICE" "${EVAL_ARGS[@]}"
done
