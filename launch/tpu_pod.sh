#!/usr/bin/env bash
# LMSI on a Cloud TPU VM pod slice: create or reuse it, install the project on every
# worker, run the same command on all workers, stream logs.
#
#   launch/tpu_pod.sh --name=lmsi-v5e --zone=us-west4-a --accelerator=v5litepod-16 \
#     --project=my-gcp-project --version=v2-alpha-tpuv5-lite -- \
#     --config=configs/gsm8k.py --workdir=gs://my-bucket/lmsi/gsm8k \
#     --config.data.source=tfds --config.model.checkpoint=/opt/models/SmolLM2-135M-Instruct
#
# Flags: --name (TPU VM name), --zone, --accelerator (type, e.g. v4-32, v5litepod-16),
# --project, --version (runtime image), --repo (a git URL every worker clones;
# default: this checkout, copied to every worker), --spot (create as spot VM),
# --no_create (fail if the VM does not exist), --python (interpreter on the workers,
# default python3; lmsi_jax needs Python >= 3.11). Everything after `--` goes to
# `python -m lmsi_jax.main`. jax.distributed.initialize() auto-detects the pod
# (lmsi_jax/distributed.py), so no coordinator flags are needed. Use a gs://
# workdir: Orbax and the pipeline's file I/O speak GCS, and every host sees it.
# model.checkpoint is read from the local disk: put it at the same path on every worker.
set -euo pipefail
NAME="" ZONE="" ACCEL="" PROJECT="" VERSION="tpu-ubuntu2204-base" REPO="" SPOT="" CREATE=1
PY=python3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator=*) ACCEL=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --repo=*) REPO=${1#*=} ;;
    --spot) SPOT="--spot" ;;
    --no_create) CREATE=0 ;;
    --python=*) PY=${1#*=} ;;
    --) shift; break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
  shift
done
: "${NAME:?--name is required}" "${ZONE:?--zone is required}" "${PROJECT:?--project is required}"
GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE" --project="$PROJECT")

if ! "${GC[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  [[ $CREATE == 1 ]] || { echo "TPU VM $NAME does not exist" >&2; exit 1; }
  : "${ACCEL:?--accelerator is required to create $NAME}"
  "${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION" $SPOT
fi

if [[ -z "$REPO" ]]; then
  ROOT=$(cd "$(dirname "$0")/.." && pwd)
  tar -C "$ROOT" --exclude=.git -czf /tmp/lmsi_jax_src.tgz .
  "${GC[@]}" scp /tmp/lmsi_jax_src.tgz "$NAME":~/lmsi_jax_src.tgz "${LOC[@]}" --worker=all
  SETUP='rm -rf ~/lmsi_jax && mkdir -p ~/lmsi_jax && tar -C ~/lmsi_jax -xzf ~/lmsi_jax_src.tgz'
else
  SETUP="rm -rf ~/lmsi_jax && git clone $REPO ~/lmsi_jax"
fi
"${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$SETUP && cd ~/lmsi_jax && \
  $PY -m pip install -q -U 'jax[tpu]' && $PY -m pip install -q -e ."

ARGS=$(printf '%q ' "$@")
# Same command on every worker; output of all workers streams here, prefixed by worker.
"${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="cd ~/lmsi_jax && $PY -m lmsi_jax.main $ARGS 2>&1"
