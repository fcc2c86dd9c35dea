#!/usr/bin/env bash
# Container entrypoint: one image for the Ray head, the Ray workers and one-off commands.
#   head                 start the Ray head (GCS 6379, dashboard and job API 8265) and block
#   worker HEAD:6379     join the cluster at HEAD:6379 and block
#   anything else        run it (bgsplit train ..., bgsplit train --ray ..., bash)
# BGSPLIT_DRY_RUN=1 prints the command instead of running it. Usage statistics are off.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
run() { if [ "${BGSPLIT_DRY_RUN:-0}" = 1 ]; then echo "$*"; else exec "$@"; fi; }
case "${1:-}" in
  head)
    shift
    run ray start --head --block --port=6379 --dashboard-host=0.0.0.0 --dashboard-port=8265 --disable-usage-stats "$@" ;;
  worker)
    [ $# -ge 2 ] || { echo "entrypoint: worker needs the head's address, e.g. worker 10.0.0.1:6379" >&2; exit 2; }
    address=$2; shift 2
    run ray start --block --address="$address" --disable-usage-stats "$@" ;;
  "")
    run bgsplit --help ;;
  *)
    run "$@" ;;
esac
