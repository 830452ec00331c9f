#!/usr/bin/env bash
# Runs N JAX processes of barlow_jax.main on this machine, as a multi-host job would.
#
#   launch/local_multiprocess.sh N [--devices_per_process=K] -- <barlow_jax.main flags>
#   launch/local_multiprocess.sh 2 -- --config=configs/cifar_bt_cpu.py --workdir=runs/mp
#
# Process i gets --coordinator_address=127.0.0.1:PORT (a free port) --num_processes=N
# --process_id=i and K CPU devices (JAX_NUM_CPU_DEVICES; default 1), so the run has N*K
# devices, exercising the same code path as a TPU pod or a GPU cluster: per-process TFDS
# splits, global arrays, gloo collectives, collective Orbax saves.
#
# Output of all processes goes to this terminal (only process 0 logs progress). SIGTERM or
# SIGINT is forwarded to every process (they save a checkpoint and exit 75). If one process
# fails, the others are stopped after GRACE_SECONDS (default 20) instead of waiting in a
# collective for JAX's heartbeat timeout. Exit status: the first non-zero one, else 0.
# PYTHON selects the interpreter (default: python).
set -uo pipefail

usage() {
  sed -n '2,5p' "$0" >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift
devices_per_process=1
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --devices_per_process=*) devices_per_process=${1#*=} ;;
    *) usage ;;
  esac
  shift
done
[[ ${1:-} == -- ]] && shift
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] || usage

python=${PYTHON:-python}
grace=${GRACE_SECONDS:-20}
cd "$(dirname "$0")/.." || exit 2  # The repository root: configs/ and barlow_jax/ resolve.

# A port free now; the coordinator (process 0) binds it a moment later.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices_per_process \
    "$python" -m barlow_jax.main --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" "$@" &
  pids+=($!)
done

forward() { kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
failed_at=
while :; do
  running=0
  for j in "${!pids[@]}"; do
    pid=${pids[$j]}
    if kill -0 "$pid" 2>/dev/null; then
      running=1
    elif [[ $pid != done ]]; then
      wait "$pid"
      s=$?
      pids[$j]=done
      if [[ $s -ne 0 && $status -eq 0 ]]; then
        status=$s
        failed_at=$SECONDS
      fi
    fi
  done
  ((running)) || break
  if [[ -n $failed_at ]] && ((SECONDS - failed_at > grace)); then
    echo "local_multiprocess.sh: a process exited with status $status; stopping the others." >&2
    for pid in "${pids[@]}"; do [[ $pid != done ]] && kill -KILL "$pid" 2>/dev/null; done
    failed_at=
  fi
  sleep 0.2
done
exit "$status"
