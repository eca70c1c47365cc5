#!/usr/bin/env bash
# Run a command with the local Slurm cluster up (slurm/local-cluster.sh), and bring the cluster down
# afterwards if this script started it. Used by `make test` so the slurm tier runs like every other.
#   [SLURM_LOCAL_NODES=N] slurm/with-local-cluster.sh <command> [args...]      (N nodes, default 1)
# Without root (slurmd and munged run as root here) the cluster cannot start: the command still runs and
# the slurm tests skip, except under CI=true, where they fail.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/toolkit-slurm}"
export SLURM_CONF="$SLURM_LOCAL_DIR/slurm.conf"
nodes="${SLURM_LOCAL_NODES:-1}"

started=""
if "$here/local-cluster.sh" status >/dev/null 2>&1; then
    # a running cluster of another size would run the tests on the wrong shape; `up` would refuse it too
    running="$(sed -n 's/^nodes=//p' "$SLURM_LOCAL_DIR/layout" 2>/dev/null)"
    if [ "${running:-1}" != "$nodes" ]; then
        echo "error: the local Slurm cluster in $SLURM_LOCAL_DIR runs ${running:-1} node(s), not SLURM_LOCAL_NODES=$nodes; run $here/local-cluster.sh down" >&2
        exit 1
    fi
elif [ "$(id -u)" -ne 0 ]; then
    echo "note: the local Slurm cluster needs root; the slurm tests will not run" >&2
elif "$here/local-cluster.sh" up --nodes "$nodes"; then
    started=1
else
    exit 1
fi
[ -n "$started" ] && trap '"$here/local-cluster.sh" down >/dev/null' EXIT
"$@"
