#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it (or reuse it), copy this checkout to every
# worker, install, run the same `python -m mopd_jax.main` command on all workers at once,
# stream their output, and delete the slice at the end (unless --keep).
#
#   bash launch/tpu_pod.sh --name=mopd-v5p --zone=us-east5-a --accelerator_type=v5p-32 \
#       -- --config=configs/code.py:qwen3_4b --workdir=/mnt/shared/q4b \
#          --config.model.checkpoint=/mnt/shared/Qwen3-4B \
#          --config.data.cache_dir=/mnt/shared/q4b_data
#
# Every worker is one JAX process; config.distributed.mode='auto' detects the pod and
# initialises jax.distributed from the TPU environment. `--workdir`, the checkpoint and
# the data cache must be paths every worker sees (a Filestore / NFS or gcsfuse mount):
# orbax writes each checkpoint from all processes into one directory.
#
# Options: --name, --zone, --accelerator_type (required); --project (default: gcloud's);
#          --version=RUNTIME (default tpu-ubuntu2204-base); --python=VERSION (the
#          workers' Python, installed with uv into ~/mopd_jax_venv; default 3.11); --spot; --reuse (the slice must
#          exist); --keep (do not delete it at the end); --setup_command=CMD (run on every
#          worker after install, e.g. to mount shared storage); --dry_run (print the
#          gcloud commands, run nothing).
set -euo pipefail

name="" zone="" accelerator_type="" project="" version="tpu-ubuntu2204-base"
python_version="3.11"
spot=0 reuse=0 keep=0 dry_run=0 setup_command=""

usage() {
  echo "usage: bash launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator_type=TYPE" \
    "[--project=P] [--version=V] [--python=V] [--spot] [--reuse] [--keep] [--setup_command=CMD]" \
    "[--dry_run] -- <arguments of python -m mopd_jax.main>" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --python=*) python_version="${1#*=}" ;;
    --setup_command=*) setup_command="${1#*=}" ;;
    --spot) spot=1 ;;
    --reuse) reuse=1 ;;
    --keep) keep=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (the arguments of mopd_jax.main go after --)" >&2
       usage ;;
  esac
  shift
done
for required in name zone accelerator_type; do
  [[ -n "${!required}" ]] || { echo "tpu_pod.sh: --${required} is required" >&2; usage; }
done
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no arguments for mopd_jax.main after --" >&2; usage; }

cd "$(dirname "$0")/.."

common=(--zone="${zone}")
[[ -z "${project}" ]] || common+=(--project="${project}")
remote_dir="mopd_jax_run"
archive_name="mopd_jax_src.tar.gz"
main_args="$(printf '%q ' "$@")"

run() {
  # Prints the command; runs it unless --dry_run.
  echo "+ $(printf '%q ' "$@")"
  [[ "${dry_run}" -eq 1 ]] || "$@"
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${name}" "${common[@]}" --worker=all --command="$1"
}

# ---------------------------------------------------------------- Slice.
if [[ "${reuse}" -eq 1 ]]; then
  run gcloud compute tpus tpu-vm describe "${name}" "${common[@]}" --format="value(state)"
else
  create=(gcloud compute tpus tpu-vm create "${name}" "${common[@]}"
          --accelerator-type="${accelerator_type}" --version="${version}")
  [[ "${spot}" -eq 0 ]] || create+=(--spot)
  run "${create[@]}"
fi

archive_dir=""
# shellcheck disable=SC2317,SC2329  # called by the trap below
teardown() {
  [[ -z "${archive_dir}" ]] || rm -rf "${archive_dir}"
  if [[ "${keep}" -eq 0 ]]; then
    run gcloud compute tpus tpu-vm delete "${name}" "${common[@]}" --quiet
  fi
}
trap teardown EXIT

# ---------------------------------------------------------------- Code and install.
if [[ "${dry_run}" -eq 1 ]]; then
  archive="LOCAL_TMP/${archive_name}"
else
  archive_dir="$(mktemp -d)"
  archive="${archive_dir}/${archive_name}"
fi
run git archive --format=tar.gz --output="${archive}" HEAD
run gcloud compute tpus tpu-vm scp "${archive}" "${name}:${archive_name}" "${common[@]}" \
  --worker=all
# The runtime image's Python may be older than the package needs (tpu-ubuntu2204-base has
# 3.10, on which pip finds no current JAX): uv brings a standalone Python into a virtual
# environment, and the `tpu` extra brings the jax[tpu] (libtpu) matching the installed jax.
venv="\$HOME/mopd_jax_venv"
on_all_workers "rm -rf ${remote_dir} && mkdir -p ${remote_dir} && tar -xzf ${archive_name} -C ${remote_dir} && cd ${remote_dir} && python3 -m pip install --quiet --user uv && python3 -m uv venv --quiet --allow-existing --python ${python_version} ${venv} && python3 -m uv pip install --quiet --python ${venv}/bin/python -e '.[tpu]'"
if [[ -n "${setup_command}" ]]; then
  on_all_workers "${setup_command}"
fi

# ---------------------------------------------------------------- Run (logs stream here).
on_all_workers "cd ${remote_dir} && ${venv}/bin/python -m mopd_jax.main ${main_args}"
