#!/usr/bin/env bash
# N CPU processes on this machine forming one JAX runtime (what the multi-host tests use).
#
#   launch/local_multiprocess.sh N [--devices_per_process D] -- <lmsi_jax.main args...>
#   launch/local_multiprocess.sh 2 -- --config=configs/demo.py:smoke --workdir=/tmp/mp
#
# Process i gets LMSI_PROCESS_ID=i; all share a free 127.0.0.1 port as coordinator.
# Logs: <workdir>/process_<i>.log when --workdir=... is given, else stdout. If any
# process fails, the others are stopped and the script exits non-zero. PYTHON picks
# the interpreter (default: python on PATH).
set -euo pipefail
N=${1:?usage: local_multiprocess.sh N [--devices_per_process D] -- args...}
shift
DEVICES=4
if [[ "${1:-}" == "--devices_per_process" ]]; then DEVICES=$2; shift 2; fi
[[ "${1:-}" == "--" ]] && shift
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
WORKDIR=""
for a in "$@"; do [[ "$a" == --workdir=* ]] && WORKDIR=${a#--workdir=}; done
[[ -n "$WORKDIR" ]] && mkdir -p "$WORKDIR"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM EXIT   # never leave orphans behind
run() {
  exec env -u XLA_FLAGS LMSI_COORDINATOR_ADDRESS="127.0.0.1:$PORT" LMSI_NUM_PROCESSES="$N" \
    LMSI_PROCESS_ID="$1" LMSI_CPU_DEVICES="$DEVICES" JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" -m lmsi_jax.main "${@:2}"
}
for ((i = 0; i < N; i++)); do
  if [[ -n "$WORKDIR" ]]; then run "$i" "$@" >"$WORKDIR/process_$i.log" 2>&1 & else run "$i" "$@" & fi
  pids+=($!)
done
# Wait for whichever process ends first (bash >= 5.1): a failure stops the rest at once
# instead of leaving them blocked in a collective with a dead peer.
status=0
left=("${pids[@]}")
while ((${#left[@]})); do
  rc=0
  wait -n -p done_pid "${left[@]}" || rc=$?
  rest=()
  for p in "${left[@]}"; do if [[ $p != "${done_pid:-}" ]]; then rest+=("$p"); fi; done
  left=("${rest[@]}")
  if [[ $rc != 0 && $status == 0 ]]; then
    status=$rc
    for ((i = 0; i < N; i++)); do
      if [[ ${pids[$i]} == "${done_pid:-}" ]]; then
        echo "local_multiprocess.sh: process $i exited with status $rc" \
          "${WORKDIR:+(log: $WORKDIR/process_$i.log) }- stopping the others" >&2
      fi
    done
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
