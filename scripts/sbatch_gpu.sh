#!/usr/bin/env bash
#SBATCH --job-name=gemma2_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# A gemma2_jax job on a SLURM GPU cluster: one process per node holding all of its GPUs, joined into
# one JAX job by `--distributed` (jax.distributed auto-detects SLURM: coordinator = first node of the
# step, process id = SLURM_PROCID). Submit from the repository root, after scripts/setup.sh gpu on a
# filesystem every node sees (the #SBATCH lines above are defaults; sbatch flags override them):
#
#   sbatch --nodes=8 scripts/sbatch_gpu.sh .venv/bin/python -m gemma2_jax.train \
#       --config=configs/pretrain_2b.py --workdir=gs://BUCKET/runs/pretrain_2b
#
# --distributed is appended unless the command has it. Ten minutes before the time limit SLURM sends
# SIGTERM (--signal=TERM@600): every process saves the same step and exits 0; a preempted job is
# requeued (--requeue) and, like a resubmission of the same command, resumes from the last checkpoint.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 && !/^#/ { exit }' \
    "${BASH_SOURCE[0]}"
  echo "usage: sbatch [--nodes=N] [--gpus-per-node=G] scripts/sbatch_gpu.sh COMMAND [ARGS...]"
}
case ${1:-} in
  -h|--help|help) usage; exit 0 ;;
  "") echo "error: no command (see scripts/sbatch_gpu.sh --help)" >&2; exit 2 ;;
esac
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "error: not inside a SLURM job: submit it with sbatch scripts/sbatch_gpu.sh COMMAND" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"

# jax.distributed's SLURM detection gives each process the one GPU numbered SLURM_LOCALID (a process
# per GPU); with one process per node, every GPU of the node is named here instead.
gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
  [[ $gpus =~ ^[1-9][0-9]*$ ]] || { echo "error: cannot tell how many GPUs this node has; set JAX_LOCAL_DEVICE_IDS=0,1,..." >&2; exit 2; }
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi

distributed=(--distributed)
for a in "$@"; do
  if [[ $a == --distributed || $a == --coordinator_address* ]]; then distributed=(); fi
done
# The job's own watchdog stops the other processes with one clear line when one fails: srun must
# not kill them first (--kill-on-bad-exit=0). All of the node's CPUs go to its one task.
exec srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=0 \
  "$@" ${distributed[@]+"${distributed[@]}"}
