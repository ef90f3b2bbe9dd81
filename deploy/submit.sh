#!/usr/bin/env bash
# Submit a GRPO run to a Ray cluster as a Ray job: the documented command line.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh deploy/configs/tiny.yaml \
#       --set corpus.path=/data/text.txt --set run.out_dir=/shared/runs/tiny
#
# which runs (from the repository root):
#
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
#       --working-dir . --runtime-env deploy/runtime_env.yaml \
#       [--submission-id ID] [--no-wait] \
#       -- dgrpo train --config deploy/configs/tiny.yaml --set corpus.path=... --set run.out_dir=...
#
# RAY_ADDRESS    the head node's dashboard URL (default http://127.0.0.1:8265; use
#                `ray dashboard deploy/cluster/ray_cluster.yaml` or a kubectl port-forward to reach
#                a remote one on 127.0.0.1)
# RAY_AUTH_MODE  token (default): the cluster's token comes from ~/.ray/auth_token,
#                $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN -- never from a file in this repository
# SUBMISSION_ID  optional job id (default: Ray makes one)
# NO_WAIT=1      return after submission instead of following the logs
#
# run.out_dir must be an absolute path on storage every node sees: the job runs in
# a temporary copy of the working directory, and the learner writes checkpoints
# from whichever node it runs on.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [--set key=value ...]" >&2
  exit 2
fi
config="$1"
shift
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
args=(--address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . --runtime-env deploy/runtime_env.yaml)
if [[ -n "${SUBMISSION_ID:-}" ]]; then args+=(--submission-id "$SUBMISSION_ID"); fi
if [[ -n "${NO_WAIT:-}" ]]; then args+=(--no-wait); fi
exec ray job submit "${args[@]}" -- dgrpo train --config "$config" "$@"
