# Shared launcher, sourced by every slurm/*.sbatch script (not submitted by itself).
#
# It works out the process layout from the allocation and defines `dreamer4_srun ARGS...`, which
# starts `python -m dreamer4.cli ARGS...` once per task with srun. Every task then finds its peers
# by itself: dreamer4 calls jax.distributed.initialize(), whose Slurm detection reads
# SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID (srun sets them
# for each task) and uses the first node of the step as the coordinator.
#
# Knobs (environment variables, all optional; set them before `sbatch` or on its command line
# with `sbatch --export=ALL,RUN=runs/big ...`):
#   CONFIG        preset                                   (configs/classic.yaml)
#   RUN           run directory on a shared file system    (runs/classic)
#   DATA          dataset directory                        ($RUN/dataset)
#   SETS          extra dotted overrides, e.g. "collect.num_episodes=4096 seed=1"
#   PROCESS_PER   device: one process per GPU (default); node: one process per node seeing all
#                 of the node's GPUs
#   FSDP          devices per "fsdp" group (runtime.fsdp); default: GPUs per node, so parameters
#                 are sharded inside a node and only gradients cross the network
#   PYTHON        interpreter of the environment dreamer4 is installed in (python); activate that
#                 environment before sbatch: --export=ALL carries it into every task
#   DREAMER4_JAX_CACHE  compilation cache shared by all tasks ($HOME/.cache/dreamer4/jax)
#   JAX_COORDINATOR_PORT  coordinator port (default: derived from the job id, as JAX does)

set -euo pipefail

REPO="${DREAMER4_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"   # submit from the repository root
cd "$REPO"

NODES="${SLURM_JOB_NUM_NODES:-1}"
# GPUs per node as the allocation states them (--gpus-per-node=4 or =a100:4); 1 without GPUs.
_gpn="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${_gpn##*:}}"
PROCESS_PER="${PROCESS_PER:-device}"
case "$PROCESS_PER" in
  device) TASKS_PER_NODE="$GPUS_PER_NODE" ;;
  node)   TASKS_PER_NODE=1 ;;
  *) echo "PROCESS_PER must be device or node, got '$PROCESS_PER'" >&2; exit 2 ;;
esac
FSDP="${FSDP:-$GPUS_PER_NODE}"
CONFIG="${CONFIG:-configs/classic.yaml}"
RUN="${RUN:-runs/classic}"
DATA="${DATA:-$RUN/dataset}"
PYTHON="${PYTHON:-python}"
export DREAMER4_JAX_CACHE="${DREAMER4_JAX_CACHE:-$HOME/.cache/dreamer4/jax}"
# The port JAX would pick by itself; fixed here so that every step of the job uses the same one.
export JAX_COORDINATOR_PORT="${JAX_COORDINATOR_PORT:-$(( ${SLURM_JOB_ID:-0} % 4096 + 61440 ))}"
export WANDB_MODE="${WANDB_MODE:-offline}"   # compute nodes usually have no internet; `wandb sync` later

# `--set KEY=VALUE` for runtime.fsdp and every entry of $SETS.
CONFIG_ARGS=(--config "$CONFIG" --set "runtime.fsdp=$FSDP")
for kv in ${SETS:-}; do CONFIG_ARGS+=(--set "$kv"); done

echo "dreamer4 on $NODES node(s) x $GPUS_PER_NODE GPU(s), one process per $PROCESS_PER" \
     "($(( NODES * TASKS_PER_NODE )) processes), fsdp=$FSDP, run $RUN"

# One multi-controller JAX job over the whole allocation: NODES x TASKS_PER_NODE processes.
# Every task sees all of its node's GPUs (no --gpu-bind): JAX gives task SLURM_LOCALID its GPU.
dreamer4_srun() {
  srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=1 \
    --export=ALL,DREAMER4_PROCESS_PER="$PROCESS_PER",JAX_COORDINATOR_PORT="$JAX_COORDINATOR_PORT",DREAMER4_JAX_CACHE="$DREAMER4_JAX_CACHE",WANDB_MODE="$WANDB_MODE" \
    "$PYTHON" -m dreamer4.cli "$@"
}

# A single process (evaluation commands that are not multi-process).
dreamer4_srun_one() {
  srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 \
    --export=ALL,DREAMER4_JAX_CACHE="$DREAMER4_JAX_CACHE",WANDB_MODE="$WANDB_MODE" \
    "$PYTHON" -m dreamer4.cli "$@"
}
