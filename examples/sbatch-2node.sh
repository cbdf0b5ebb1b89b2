#!/bin/bash
# Llama-2-70B QLoRA on 2 nodes x 8 GPUs under SLURM: one llmft process per
# GPU, started by srun. Each rank reads its rank from SLURM's variables
# (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and uses the GPU of its local
# rank; the rendezvous is MASTER_ADDR:MASTER_PORT, exported below.
#
# dist.strategy = hybrid_shard: the weights are sharded over the 8 GPUs of a
# node (NVLink) and each node holds a whole copy, so only the gradient sum
# crosses the network.
#
#   sbatch examples/sbatch-2node.sh
#   sbatch --nodes=4 examples/sbatch-2node.sh                  # more nodes
#   GPUS_PER_NODE=4 sbatch --gpus-per-node=4 --ntasks-per-node=4 examples/sbatch-2node.sh
#
#SBATCH --job-name=llmft-70b-qlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# Exported: srun hands the environment to every task.
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CONFIG=${CONFIG:-examples/llama2-70b-qlora-2gpu.toml}

# Rank 0 runs on the first node of the allocation (llmft would also take
# that host from SLURM_JOB_NODELIST; exported, every tool agrees on it).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
# NVLink SHARP (multicast) off; NCCL uses its rings and trees.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# 8 GPUs of 80+ GB per node hold a node's shard of the weights: no offload.
# Every task must see all of its node's GPUs (local rank i uses cuda:i), so no
# --gpus-per-task or --gpu-bind here.
srun --kill-on-bad-exit=1 \
    llmft train --config "$CONFIG" \
    --set dist.strategy=hybrid_shard \
    --set offload.params=false \
    --set offload.activations=false \
    --set train.output_dir="runs/llama2-70b-qlora-${SLURM_NNODES}x${GPUS_PER_NODE}"

# Alternative: one `llmft launch` per node starts that node's ranks (as
# torchrun would). The single quotes matter: SLURM_NODEID must expand on each
# node, not here on the first one.
#
# srun --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 bash -c '
#     llmft launch --nproc-per-node "$GPUS_PER_NODE" \
#         --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
#         -- train --config "$CONFIG" --set dist.strategy=hybrid_shard \
#         --set offload.params=false --set offload.activations=false'
