#!/usr/bin/env bash
# A training Job's work, run in every pod: a base network, then Fast Geometric Ensembling from it,
# each under torchrun (DDP across every pod's processes); then the first pod exports the snapshots
# as the next version of the ensemble in the model repository and has the running servers load it.
#
# torchrun takes its topology from PET_* variables (PET_NNODES, PET_NPROC_PER_NODE, and the c10d
# rendezvous PET_RDZV_BACKEND/ENDPOINT/ID), which the Job or PyTorchJob sets. The recipe comes
# from VALLEY_TRAIN_ARGS and VALLEY_FGE_ARGS (train.env); VALLEY_RELOAD_ARGS says how to reach the
# servers (TLS and an admin token).
# Every step resumes: a restarted pod or worker group continues from the last checkpoint, a
# finished training is not rejoined, and an ensemble already exported by this run is not
# exported twice.
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
read -r -a reload_args <<< "${VALLEY_RELOAD_ARGS:-}"

# Each torchrun is a rendezvous of its own: the second must not meet in the first one's.
rendezvous() {
  if [ -n "${PET_RDZV_ID:-}" ]; then
    echo "--rdzv-id=$PET_RDZV_ID-$1"
  fi
}

# A pod restarted after training finished (say, pod 0 failing to export) must not wait for the
# other pods in a new rendezvous: they are gone.
if [ ! -s "$run_dir/fge/report.json" ]; then
  # shellcheck disable=SC2046 # rendezvous prints one word or nothing
  torchrun $(rendezvous train) --no-python valley-train train "${train_args[@]}" --out "$run_dir/base" --resume
  # shellcheck disable=SC2046
  torchrun $(rendezvous fge) --no-python valley-train fge --from "$run_dir/base" "${fge_args[@]}" \
    --out "$run_dir/fge" --resume
fi

if [ "$node" != 0 ]; then
  exit 0
fi
exported=$run_dir/exported.json
if [ ! -s "$exported" ]; then
  # One process: the Kubeflow operator also sets WORLD_SIZE and RANK for the pods, meant for torchrun.
  env -u WORLD_SIZE -u RANK -u LOCAL_RANK \
    valley-train export --from "$run_dir/fge" --name "$ensemble" --out "$repository" > "$exported.partial"
  mv "$exported.partial" "$exported"
fi
cat "$exported"
if [ -n "${VALLEY_RELOAD_TARGET:-}" ]; then
  # The version is published either way: servers that miss the reload load it when they restart.
  for attempt in 1 2 3; do
    if valley-reload --target "$VALLEY_RELOAD_TARGET" --model "$ensemble" "${reload_args[@]}"; then
      exit 0
    fi
    echo "valley-reload failed (attempt $attempt of 3)" >&2
    sleep 10
  done
  echo "the servers did not all load the new version; it is in $repository/$ensemble" >&2
fi
