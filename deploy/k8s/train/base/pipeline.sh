#!/usr/bin/env bash
# A training Job's work, run in every pod: a base network, then Fast Geometric Ensembling from it,
# each under torchrun (DDP across every pod's processes); then the first pod exports the snapshots
# as the next version of the ensemble in the model repository and has the running servers load it.
#
# torchrun takes its topology from PET_* variables: the Job sets PET_NNODES, PET_NPROC_PER_NODE,
# PET_NODE_RANK and PET_MASTER_ADDR/PORT itself; the Kubeflow training operator sets them for a
# PyTorchJob. The recipe comes from VALLEY_TRAIN_ARGS and VALLEY_FGE_ARGS (train.env).
# Every step resumes: a restarted pod or worker group continues from the last checkpoint, and
# an ensemble already exported by this run is not exported twice.
set -euo pipefail

run_dir=${VALLEY_RUN_DIR:?VALLEY_RUN_DIR: the run folder, shared by every pod of this Job}
ensemble=${VALLEY_ENSEMBLE:?VALLEY_ENSEMBLE: the ensemble name in the model repository}
repository=${VALLEY_MODELS:-/models}
node=${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-0}}
# A restarted worker group must not reuse the store of the group it replaces (pytorch/pytorch#135712):
# with the shared store, restarts after a killed worker sometimes fail to connect.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
read -r -a train_args <<< "${VALLEY_TRAIN_ARGS:-}"
read -r -a fge_args <<< "${VALLEY_FGE_ARGS:-}"

torchrun --no-python valley-train train "${train_args[@]}" --out "$run_dir/base" --resume
torchrun --no-python valley-train fge --from "$run_dir/base" "${fge_args[@]}" --out "$run_dir/fge" --resume

if [ "$node" != 0 ]; then
  exit 0
fi
exported=$run_dir/exported.json
if [ ! -s "$exported" ]; then
  valley-train export --from "$run_dir/fge" --name "$ensemble" --out "$repository" > "$exported.partial"
  mv "$exported.partial" "$exported"
fi
cat "$exported"
if [ -n "${VALLEY_RELOAD_TARGET:-}" ]; then
  valley-reload --target "$VALLEY_RELOAD_TARGET" --model "$ensemble"
fi
