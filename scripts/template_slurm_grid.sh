#!/usr/bin/env bash
# The experiment grid on a SLURM cluster: one array task per shard. Task i of n runs
#   python -m elbo_t2ialign.grid $GRID --shard i/n
# i.e. images i, i+n, i+2n, ... of every cell of the grid (configs/grid/$GRID.yaml); cells resume,
# a cell is evaluated by whichever task finishes its last image, and every task ends by writing the
# report under a lock, so the last task to finish writes the complete one (<output_dir>/report).
# Copy this file, edit the #SBATCH lines and the block below, and submit from the repository root:
#   sbatch scripts/template_slurm_grid.sh
#   sbatch --array=0-15 --export=ALL,GRID=paper scripts/template_slurm_grid.sh   # 16 shards
# The number of shards is the array's size (sbatch --array overrides the line below). See what each
# task would run, without SLURM:
#   DRY_RUN=1 SLURM_ARRAY_TASK_ID=0 SLURM_ARRAY_TASK_COUNT=4 bash scripts/template_slurm_grid.sh
#SBATCH --job-name=elbo-grid
#SBATCH --array=0-3
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=48G
#SBATCH --time=24:00:00
#SBATCH --output=elbo-grid-%A_%a.out
set -euo pipefail

# ---- edit here -------------------------------------------------------------
GRID=${GRID:-paper}                  # a file in configs/grid/ (paper, demo) or a grid YAML path
read -r -a GRID_ARGS <<< "${GRID_ARGS:-}"   # Hydra overrides for every cell, e.g. dataset.split=val_100
# ---------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
: "${SLURM_ARRAY_TASK_ID:?submit this as an array job: sbatch --array=0-<n-1> $0}"
COUNT=${SLURM_ARRAY_TASK_COUNT:?this SLURM sets no SLURM_ARRAY_TASK_COUNT: set it to the array size}
INDEX=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} ))   # --array=1-4 works too
if (( INDEX < 0 || INDEX >= COUNT )); then
  echo "array task $SLURM_ARRAY_TASK_ID is outside 0..$((COUNT - 1)) (min ${SLURM_ARRAY_TASK_MIN:-0}); use a contiguous --array" >&2
  exit 2
fi

CMD=("$PYTHON" -m elbo_t2ialign.grid "$GRID" --shard "$INDEX/$COUNT" "${GRID_ARGS[@]}")
if [ -n "${DRY_RUN:-}" ]; then   # print the command, run nothing
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
