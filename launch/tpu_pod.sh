#!/usr/bin/env bash
# Runs barlow_jax.main on every host of a Cloud TPU VM pod slice, the same command on each.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo=DIR] -- <barlow_jax.main flags>
#   launch/tpu_pod.sh --tpu=bt-v4-32 --zone=us-central2-b -- \
#       --config=configs/imagenet_bt.py --workdir=gs://BUCKET/bt --config.data_dir=gs://BUCKET/tfds
#
# Assumes the repository is checked out and installed (pip install -e '.[tpu]') at --repo
# (default: ~/barlow_jax) on every host, and that the workdir and data dir are where all
# hosts see them: a gs:// bucket (passed through untouched; nothing here creates or resolves
# the workdir, the run does) or a shared filesystem (Filestore/NFS). --distributed makes each host call
# jax.distributed.initialize(), which finds the coordinator, the host count and the host's
# index from the TPU metadata; nothing in the config changes with the number of hosts.
#
# A preempted (spot) TPU VM gets SIGTERM: the run saves a checkpoint at a step all hosts
# agree on and exits 75. Run the same command again to resume from it.
set -euo pipefail

tpu= zone= project= repo='~/barlow_jax'
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    *) sed -n '2,5p' "$0" >&2; exit 2 ;;
  esac
  shift
done
[[ ${1:-} == -- ]] && shift
if [[ -z $tpu || -z $zone ]]; then
  sed -n '2,5p' "$0" >&2
  exit 2
fi

# Quote every argument for the remote shell, so values with spaces survive.
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" ${project:+--project="$project"} \
  --worker=all \
  --command="cd $repo && python3 -m barlow_jax.main --distributed$args"
