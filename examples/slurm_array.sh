#!/usr/bin/env bash
# Reconstruct avatars and render turntables for every portrait in portraits.txt, 16 tasks in parallel.
# Each task takes every 16th line (fhavatar reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT itself).
# Re-submitting the same script resumes: finished items are skipped, pre-empted items continue.
#
#   sbatch examples/slurm_array.sh portraits.txt /scratch/$USER/avatars
#
#SBATCH --job-name=fhavatar
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=logs/fhavatar_%A_%a.jsonl

set -uo pipefail
LIST=${1:?usage: slurm_array.sh LIST.txt OUT_DIR}
OUT=${2:?usage: slurm_array.sh LIST.txt OUT_DIR}
FHAVATAR=${FHAVATAR:-fhavatar}

# SLURM sets CUDA_VISIBLE_DEVICES for the allocated GPU, so each task uses its own GPU as cuda:0.
"$FHAVATAR" --log-json run "@$LIST" --out "$OUT" --turntable-frames 120 --device auto &
pid=$!
# --signal=B:TERM signals this shell only: pass it on; fhavatar then stops after the current item (exit 130).
trap 'kill -TERM "$pid" 2>/dev/null' TERM
wait "$pid"; code=$?
if kill -0 "$pid" 2>/dev/null || [ "$code" -gt 128 ]; then wait "$pid"; code=$?; fi
case $code in
  0)   echo "task $SLURM_ARRAY_TASK_ID: all items done" >&2 ;;
  1)   echo "task $SLURM_ARRAY_TASK_ID: some items failed (see the JSON lines / fhavatar status $OUT)" >&2 ;;
  75)  echo "task $SLURM_ARRAY_TASK_ID: some items were locked by another job, left to it (fhavatar status $OUT)" >&2 ;;
  130) echo "task $SLURM_ARRAY_TASK_ID: pre-empted; requeue to continue" >&2 ;;
  *)   echo "task $SLURM_ARRAY_TASK_ID: could not start (exit $code)" >&2 ;;
esac
exit $code
