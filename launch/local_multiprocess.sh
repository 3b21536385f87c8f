#!/usr/bin/env bash
# N CPU processes on this machine forming one JAX runtime (what the multi-host tests use).
#
#   launch/local_multiprocess.sh N [--devices_per_process D] -- <lmsi_jax.main args...>
#   launch/local_multiprocess.sh 2 -- --config=configs/demo.py:smoke --workdir=/tmp/mp
#
# Process i gets LMSI_PROCESS_ID=i; all share a free 127.0.0.1 port as coordinator.
# Logs: <workdir>/process_<i>.log when --workdir=... is given, else stdout. If any
# process fails, the others are stopped and the script exits non-zero.
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
for ((i = 0; i < N; i++)); do
  log=/dev/stdout
  [[ -n "$WORKDIR" ]] && log="$WORKDIR/process_$i.log"
  env -u XLA_FLAGS LMSI_COORDINATOR_ADDRESS="127.0.0.1:$PORT" LMSI_NUM_PROCESSES="$N" \
    LMSI_PROCESS_ID="$i" LMSI_CPU_DEVICES="$DEVICES" JAX_PLATFORMS=cpu \
    python -m lmsi_jax.main "$@" >"$log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
