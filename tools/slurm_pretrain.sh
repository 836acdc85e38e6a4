#!/bin/bash
# DINO pretraining on 2 nodes x 8 GPUs (16 processes, global batch 16 x batch_size_per_gpu).
#
#   DATA=/datasets/imagenet/train sbatch tools/slurm_pretrain.sh [extra dino-vos pretrain flags]
#
# LAUNCH=srun (default): one task per GPU; dino-vos reads SLURM_PROCID / SLURM_NTASKS /
#   SLURM_LOCALID and joins the NCCL group at MASTER_ADDR:MASTER_PORT.
# LAUNCH=torchrun: one task per node, each running torchrun with 8 processes and a c10d
#   rendezvous on the first node.
# The run always passes --resume: a requeued or resubmitted job continues from the last
# checkpoint in OUT (a new OUT starts a new run).
#SBATCH --job-name=dino-vos-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

DATA=${DATA:?set DATA to the training images (a folder, searched recursively)}
PRESET=${PRESET:-vit_small_p8}
OUT=${OUT:-runs/${PRESET}-${SLURM_JOB_ID}}
LAUNCH=${LAUNCH:-srun}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORKERS=$((SLURM_CPUS_PER_TASK > 2 ? SLURM_CPUS_PER_TASK - 2 : 1))

ARGS=(pretrain --preset "$PRESET" --data "$DATA" --out "$OUT" --num-workers "$WORKERS" --resume "$@")

if [ "$LAUNCH" = torchrun ]; then
    srun --ntasks-per-node=1 --cpus-per-task=$((SLURM_CPUS_PER_TASK * GPUS_PER_NODE)) \
        --kill-on-bad-exit=1 \
        torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
        --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
        -m dino_vos "${ARGS[@]}"
else
    srun --kill-on-bad-exit=1 dino-vos "${ARGS[@]}"
fi
