#!/usr/bin/env bash
# Run a command with the local Slurm cluster up (slurm/local-cluster.sh), and bring the cluster down
# afterwards if this script started it. Used by `make test` so the slurm tier runs like every other.
#   slurm/with-local-cluster.sh <command> [args...]
# Without root (slurmd and munged run as root here) the cluster cannot start: the command still runs and
# the slurm tests skip, except under CI=true, where they fail.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/toolkit-slurm}"
export SLURM_CONF="$SLURM_LOCAL_DIR/slurm.conf"

started=""
if ! "$here/local-cluster.sh" status >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: the local Slurm cluster needs root; the slurm tests will not run" >&2
    elif "$here/local-cluster.sh" up; then
        started=1
    else
        exit 1
    fi
fi
[ -n "$started" ] && trap '"$here/local-cluster.sh" down >/dev/null' EXIT
"$@"
