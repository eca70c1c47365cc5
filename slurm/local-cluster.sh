#!/usr/bin/env bash
# A real single-node Slurm cluster on 127.0.0.1 for development and tests (Debian's slurm-wlm + munge),
# run as root without systemd; every file it writes lives in one directory.
#   slurm/local-cluster.sh up | down | status      (SLURM_LOCAL_DIR overrides the directory)
# After `up`, point clients at it:  export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/toolkit-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "error: $1 not found; install Slurm with: apt-get install -y slurm-wlm" >&2
        exit 2
    }
}

running() {
    local pid
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" && kill -0 "$pid" 2>/dev/null
}

write_conf() {
    local cpus mem
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
    cat >"$CONF" <<CONF
ClusterName=toolkit-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket.2
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
    need slurmctld
    need slurmd
    need munged
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR"
    if ! running munged; then
        install -m 0600 /etc/munge/munge.key "$DIR/munge.key"
        munged --force -S "$DIR/munge.socket.2" --key-file="$DIR/munge.key" --log-file="$DIR/munged.log" \
            --pid-file="$DIR/munged.pid" --seed-file="$DIR/munged.seed"
    fi
    [ -f "$CONF" ] || write_conf
    export SLURM_CONF="$CONF"
    running slurmctld || slurmctld -f "$CONF"
    running slurmd || slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then
            echo "Slurm is up: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "error: Slurm did not become idle in 30 s; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    exit 1
}

down() {
    for daemon in slurmd slurmctld munged; do
        if running "$daemon"; then
            kill "$(cat "$DIR/$daemon.pid")"
            for _ in $(seq 1 40); do running "$daemon" || break; sleep 0.25; done
        fi
        rm -f "$DIR/$daemon.pid"
    done
    echo "Slurm is down"
}

status() {
    local state=0
    for daemon in munged slurmctld slurmd; do
        if running "$daemon"; then echo "$daemon: running (pid $(cat "$DIR/$daemon.pid"))"; else echo "$daemon: stopped"; state=3; fi
    done
    [ "$state" -eq 0 ] && SLURM_CONF="$CONF" sinfo
    return "$state"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
