#!/usr/bin/env bash
# N training processes on this machine, talking over 127.0.0.1, each with its own fake CPU
# devices: the multi-host code path (jax.distributed, per-process batch rows and
# verification, one writer, checkpoints from every process) without a cluster.
#
#   bash launch/local.sh --num_processes=2 --devices_per_process=2 -- \
#       --config=configs/code.py --workdir=/tmp/mopd_local --config.total_steps=5
#
# Everything after `--` goes to `python -m mopd_jax.main` unchanged. Each process gets
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
# config.distributed.mode='auto') and XLA_FLAGS=--xla_force_host_platform_device_count=D.
# Output lines are prefixed with "[process i]". The script waits for all processes and
# exits with the first non-zero status; once one process fails, the others get SIGTERM
# and, after --grace_s seconds, SIGKILL. SIGTERM / SIGINT to this script is passed on to
# every process (each saves a checkpoint at the same step and stops).
#
# Options: --num_processes=N (required), --devices_per_process=D (default 1),
#          --port=P (default: a free port), --grace_s=S (default 30),
#          --python=PATH (default: $PYTHON or python3), --dry_run (print, do not run).
set -euo pipefail

num_processes=""
devices_per_process=1
port=""
grace_s=30
python_bin="${PYTHON:-python3}"
dry_run=0

usage() {
  echo "usage: bash launch/local.sh --num_processes=N [--devices_per_process=D] [--port=P]" \
    "[--grace_s=S] [--python=PATH] [--dry_run] -- <arguments of python -m mopd_jax.main>" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --grace_s=*) grace_s="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (the arguments of mopd_jax.main go after --)" >&2
       usage ;;
  esac
  shift
done

positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: $1='$2' must be a positive integer" >&2; exit 2; }; }
positive --num_processes "${num_processes}"
positive --devices_per_process "${devices_per_process}"
positive --grace_s "${grace_s}"
[[ $# -gt 0 ]] || { echo "local.sh: no arguments for mopd_jax.main after --" >&2; usage; }

cd "$(dirname "$0")/.."

if [[ -z "${port}" ]]; then
  if [[ "${dry_run}" -eq 1 ]]; then
    port=PORT
  else
    port="$("${python_bin}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
[[ "${port}" == PORT ]] || positive --port "${port}"

process_env() {
  echo "JAX_PLATFORMS=cpu" \
    "XLA_FLAGS=--xla_force_host_platform_device_count=${devices_per_process}" \
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:${port}" \
    "JAX_NUM_PROCESSES=${num_processes}" "JAX_PROCESS_ID=$1"
}

if [[ "${dry_run}" -eq 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    echo "env $(process_env "${i}") ${python_bin} -m mopd_jax.main $(printf '%q ' "$@")"
  done
  exit 0
fi

pids=()
stop_all() {
  local signal="$1"
  for pid in "${pids[@]}"; do
    kill "-${signal}" "${pid}" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317,SC2329  # called by the traps below
forward_signal() {
  echo "local.sh: $1 received, passing SIGTERM to every process" >&2
  stop_all TERM
}
trap 'forward_signal SIGTERM' TERM
trap 'forward_signal SIGINT' INT

for ((i = 0; i < num_processes; i++)); do
  # shellcheck disable=SC2046
  env $(process_env "${i}") "${python_bin}" -u -m mopd_jax.main "$@" \
    > >(sed -u "s/^/[process ${i}] /") 2>&1 &
  pids+=("$!")
  echo "local.sh: process ${i} is pid $!" >&2
done

status=0
running=("${pids[@]}")
deadline=""
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "${pid}" 2>/dev/null; then
      still+=("${pid}")
      continue
    fi
    code=0
    wait "${pid}" || code=$?
    if [[ "${code}" -ne 0 && "${status}" -eq 0 ]]; then
      status="${code}"
      echo "local.sh: pid ${pid} exited with status ${code}; stopping the other processes" >&2
      stop_all TERM
      deadline=$((SECONDS + grace_s))
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if [[ -n "${deadline}" && ${SECONDS} -ge ${deadline} && ${#running[@]} -gt 0 ]]; then
    echo "local.sh: processes ${running[*]} still running after ${grace_s}s; SIGKILL" >&2
    stop_all KILL
    deadline=""
  fi
  [[ ${#running[@]} -eq 0 ]] || sleep 0.5
done
wait
exit "${status}"
