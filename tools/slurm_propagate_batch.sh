#!/bin/bash
# propagate-batch as a SLURM job array: every array task takes one shard of JOBS (balanced by
# frame count), one GPU each.
#
#   JOBS=videos.csv OUT=results sbatch --array=0-15 tools/slurm_propagate_batch.sh [flags]
#
# Each task reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, writes its videos to
# OUT/<id>/ and its reports to OUT/batch-<k>-of-<n>.json and OUT/failures-<k>-of-<n>.jsonl.
# Resubmitting the same array resumes: finished videos are reused, failed ones are retried.
# Keep --ntasks=1 per task (several tasks per array element would be torchrun-style ranks).
#SBATCH --job-name=dino-vos-batch
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

JOBS=${JOBS:?set JOBS to a .csv, a .jsonl or a YouTube-VOS-layout folder}
OUT=${OUT:?set OUT to the output folder (shared by every array task)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}

# exit code 1 means some videos failed (listed in the failures file), 2 a bad invocation
srun dino-vos propagate-batch "$JOBS" --out "$OUT" --device cuda "$@"
