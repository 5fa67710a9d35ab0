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
#
# Preemption and time limits. The scripts ask Slurm for SIGUSR1 five minutes before the time limit
# (`#SBATCH --signal=B:USR1@300`, to this batch shell) and allow requeueing (`#SBATCH --requeue`;
# `--open-mode=append` keeps one log across reruns). Each srun step runs in the background so that
# the shell's traps run while it works: a SIGUSR1, SIGTERM or SIGINT the shell receives is
# forwarded to the step (srun passes it to every task; SIGINT as SIGTERM). The dreamer4 processes
# agree on a step, checkpoint it and exit with 75 (runtime/preempt.py). Then:
#   * after SIGUSR1 (the time limit is near) the job requeues itself (`scontrol requeue`) unless the
#     step failed, and the rerun (same job id, SLURM_RESTART_COUNT + 1) resumes from the checkpoint
#     (a task that saved writes $RUN/.preempted-job<id>: srun kills the other tasks once one exits
#     75, so the step's own status may be theirs; the mark makes it count as 75);
#     a later stage of the script is not started (a step that finished anyway returns normally, and
#     the requeue happens where the next stage would have started);
#   * after SIGTERM or SIGINT (scancel, preemption) the script stops with 75 and does not requeue
#     itself (a preempted job is requeued by Slurm where the cluster's PreemptMode says so).
# Signals sent to the tasks directly (`scancel --signal=TERM JOB`) also end the step with 75; the
# script then stops without requeueing.

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

EXIT_PREEMPTED=75          # a stage stopped by a signal after saving everything (runtime/preempt.py)
# A task that stopped on a signal with everything saved writes this file (dreamer4/cli.py) before it
# exits 75. srun's --kill-on-bad-exit then kills the other tasks, which may not have exited 75 yet,
# so the step's status alone does not tell whether the checkpoint was saved. On the shared run dir.
export DREAMER4_PREEMPT_MARK
DREAMER4_PREEMPT_MARK="$(case "$RUN" in /*) echo "$RUN" ;; *) echo "$PWD/$RUN" ;; esac)/.preempted-job${SLURM_JOB_ID:-none}"
_D4_SIGNAL=""              # the first signal this shell received
_D4_STEP_PID=""            # the srun step running now
_D4_FORWARDED=""           # whether the signal has reached the running step

# Pass the received signal on to the running step (SIGINT as SIGTERM), once.
_d4_forward() {
  [ -n "$_D4_STEP_PID" ] && [ -z "$_D4_FORWARDED" ] || return 0
  _D4_FORWARDED=1
  kill -s "$([ "$_D4_SIGNAL" = INT ] && echo TERM || echo "$_D4_SIGNAL")" "$_D4_STEP_PID" 2>/dev/null || true
}

_d4_on_signal() {
  [ -n "$_D4_SIGNAL" ] || _D4_SIGNAL="$1"
  echo "launch.sh: SIG$1 received at $(date '+%F %T'); the running stage checkpoints and stops" >&2
  _d4_forward
}
trap '_d4_on_signal USR1' USR1
trap '_d4_on_signal TERM' TERM
trap '_d4_on_signal INT' INT

# After a signal: requeue (SIGUSR1, the time limit is near) and end the script with 75. $1: the
# step's exit code (0: no step was running, or it had finished). A step whose status is neither 0
# nor 75 counts as stopped with everything saved when a task wrote the mark (above).
_d4_stop() {
  local rc="$1"
  if [ "$rc" != 0 ] && [ "$rc" != "$EXIT_PREEMPTED" ] && [ -e "$DREAMER4_PREEMPT_MARK" ]; then
    echo "launch.sh: the step ended with status $rc after a task reported its checkpoint saved" \
         "(srun stops the other tasks once one exits 75); taken as stopped with everything saved" >&2
    rc="$EXIT_PREEMPTED"
  fi
  if [ "$_D4_SIGNAL" = USR1 ] && { [ "$rc" = 0 ] || [ "$rc" = "$EXIT_PREEMPTED" ]; } && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "launch.sh: requeueing job $SLURM_JOB_ID before its time limit; the rerun resumes from the checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID" \
      || echo "launch.sh: scontrol requeue failed; resubmit the same command to continue" >&2
    exit "$EXIT_PREEMPTED"
  fi
  exit "$([ "$rc" = 0 ] && echo "$EXIT_PREEMPTED" || echo "$rc")"
}

# Run one srun step in the background and wait for it (a trapped signal interrupts `wait`, which
# is then resumed); the step's exit code is returned, or the script stops after a signal.
_d4_step() {
  [ -z "$_D4_SIGNAL" ] || _d4_stop 0   # a signal came between steps: do not start another stage
  rm -f "$DREAMER4_PREEMPT_MARK"       # an earlier step's (or run's) mark says nothing about this one
  "$@" &
  _D4_STEP_PID=$!
  # A signal handled between the fork and the line above found no step to pass it to (the step
  # may already be running: a heavily loaded node showed this); pass it on now.
  [ -z "$_D4_SIGNAL" ] || _d4_forward
  local rc=0 again
  while :; do
    wait "$_D4_STEP_PID" && rc=0 || rc=$?
    kill -0 "$_D4_STEP_PID" 2>/dev/null || break
  done
  # A trap that interrupted `wait` (rc 128 + signal) may have let the step end, and this shell reap
  # it, before `kill -0` looked: its own status (75 after a checkpoint) is then still uncollected.
  # (127: `wait` above had collected it, rc is the step's.)
  if [ -n "$_D4_SIGNAL" ] && [ "$rc" -gt 128 ]; then
    wait "$_D4_STEP_PID" 2>/dev/null && rc=0 || { again=$?; [ "$again" = 127 ] || rc="$again"; }
  fi
  _D4_STEP_PID=""
  # (a step that finished despite the signal returns 0: a next stage, if any, is not started)
  [ -z "$_D4_SIGNAL" ] || [ "$rc" = 0 ] || _d4_stop "$rc"
  return "$rc"
}

# One multi-controller JAX job over the whole allocation: NODES x TASKS_PER_NODE processes.
# Every task sees all of its node's GPUs (no --gpu-bind): JAX gives task SLURM_LOCALID its GPU.
dreamer4_srun() {
  _d4_step srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=1 \
    --export=ALL,DREAMER4_PROCESS_PER="$PROCESS_PER",JAX_COORDINATOR_PORT="$JAX_COORDINATOR_PORT",DREAMER4_JAX_CACHE="$DREAMER4_JAX_CACHE",WANDB_MODE="$WANDB_MODE" \
    "$PYTHON" -m dreamer4.cli "$@"
}

# A single process (evaluation commands that are not multi-process, and the PPO trainer).
dreamer4_srun_one() {
  _d4_step srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 \
    --export=ALL,DREAMER4_JAX_CACHE="$DREAMER4_JAX_CACHE",WANDB_MODE="$WANDB_MODE" \
    "$PYTHON" -m dreamer4.cli "$@"
}
