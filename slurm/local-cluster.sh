#!/usr/bin/env bash
# A real Slurm cluster on this machine for development and tests (Debian's slurm-wlm + munge), run as root
# without systemd; every file it writes lives in one directory.
#   slurm/local-cluster.sh up [--nodes N] | down | status      (SLURM_LOCAL_DIR overrides the directory)
# One node (the default) is this host on 127.0.0.1. With N > 1 each node<i> is a network namespace with
# its own address, hostname and /etc/hosts, joined by a bridge, so the nodes talk over real TCP:
#   bridge ${SLURM_LOCAL_NAME:-tkslurm}0 at ${SLURM_LOCAL_SUBNET:-10.222.0}.1 (slurmctld and munged run here),
#   node<i> at <subnet>.1<i> in namespace <name>-node<i>, veth <name><i> on the bridge, eth0 inside.
# SLURM_LOCAL_PORT is slurmctld's port (default 6817; slurmd listens on the next one).
# After `up`, point clients at it:  export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/toolkit-slurm}"
CONF="$DIR/slurm.conf"
LAYOUT="$DIR/layout"
HOST="$(hostname -s)"
NODES=1
NAME="${SLURM_LOCAL_NAME:-tkslurm}"
SUBNET="${SLURM_LOCAL_SUBNET:-10.222.0}"
PORT="${SLURM_LOCAL_PORT:-6817}"

need() {  # need COMMAND [DEBIAN-PACKAGE]
    command -v "$1" >/dev/null 2>&1 || {
        if [ -n "${2:-}" ]; then echo "error: $1 not found; install it with: apt-get install -y $2" >&2
        else echo "error: $1 not found; install Slurm with: apt-get install -y slurm-wlm" >&2; fi
        exit 2
    }
}

# A zombie counts as stopped: without systemd, whatever reaps orphans here may take its time.
running() {
    local pid stat
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" && stat="$(ps -o stat= -p "$pid" 2>/dev/null)" && [ "${stat:0:1}" != Z ]
}

# What the conf describes, one key a line; it decides whether a kept conf still fits the request and tells
# `down` and `status` what `up` built, whatever the environment says then.
layout() {
    echo "nodes=$NODES"
    if [ "$NODES" -gt 1 ]; then echo "name=$NAME"; echo "subnet=$SUBNET"; fi
    echo "port=$PORT"
}

# The recorded layout; a conf written before layouts were recorded is the one-node default.
recorded() {
    if [ -f "$LAYOUT" ]; then cat "$LAYOUT"; elif [ -f "$CONF" ]; then printf 'nodes=1\nport=6817\n'; fi
}

oneline() { tr '\n' ' ' | sed 's/ $//'; }

# Take NODES and NAME from the recorded layout, so `down` removes what `up` made.
load_layout() {
    local rec
    rec="$(recorded)"
    [ -n "$rec" ] || return 0
    NODES="$(sed -n 's/^nodes=//p' <<<"$rec")"
    NAME="$(sed -n 's/^name=//p' <<<"$rec")"
    NAME="${NAME:-tkslurm}"
}

daemons() {  # the pid-file names of this layout's slurmds
    if [ "$NODES" -gt 1 ]; then seq -f "slurmd-node%g" 1 "$NODES"; else echo slurmd; fi
}

ready() {  # how many nodes are up (idle, or busy with jobs, and responding)
    SLURM_CONF="$CONF" sinfo -h -N -o "%N %t" 2>/dev/null | sort -u | grep -cE " (idle|mix|alloc)$" || true
}

write_conf() {
    local cpus mem ctld_addr spool pidf logf
    cpus="$(nproc)"
    # the nodes share this machine's memory: each gets its share, so jobs can't oversubscribe it
    mem="$(awk -v n="$NODES" '/MemTotal/ {print int($2 / 1024 * 0.8 / n)}' /proc/meminfo)"
    if [ "$NODES" -gt 1 ]; then
        # %n: all slurmds share this directory, so each node needs its own pid file, log and spool
        ctld_addr="$SUBNET.1" spool="$DIR/spool/%n" pidf="$DIR/slurmd-%n.pid" logf="$DIR/slurmd-%n.log"
    else
        ctld_addr=127.0.0.1 spool="$DIR/spool" pidf="$DIR/slurmd.pid" logf="$DIR/slurmd.log"
    fi
    cat >"$CONF" <<CONF
ClusterName=toolkit-local
SlurmctldHost=$HOST($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket.2
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$pidf
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$logf
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
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
# a node whose slurmd stops answering is DOWN after 30 s (Slurm's default, 300 s, suits real clusters):
# its jobs end then instead of five minutes later
SlurmdTimeout=30
CONF
    if [ "$NODES" -gt 1 ]; then
        for i in $(seq 1 "$NODES"); do
            echo "NodeName=node$i NodeAddr=$SUBNET.1$i CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
        done
    else
        echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    layout >"$LAYOUT"
}

# The nodes' /etc/hosts: jobs find each other by node name (MASTER_ADDR is the first node of the job), and
# this host's name must lead to the bridge, not to a node's own loopback. And their /etc/resolv.conf: no
# packet leaves the bridge (no forwarding, no NAT), so the host's nameserver is unreachable from a node and
# every name not in the hosts file (c10d's reverse lookups, glibc's IPv6 lookups) would wait 10 s for it;
# a nameserver on the node's own loopback answers "no" at once.
write_node_files() {  # rewritten in place: running nodes have these inodes bind-mounted
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$SUBNET.1 $HOST"
        for i in $(seq 1 "$NODES"); do echo "$SUBNET.1$i node$i"; done
    } >"$DIR/hosts"
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$DIR/resolv.conf"
}

has_link() { ip link show dev "$1" >/dev/null 2>&1; }

# Docker and friends load br_netfilter and drop forwarded packets by default, which would drop traffic
# between two ports of our bridge too; let it through, by a rule naming only our bridge.
forward_rule() { iptables "$1" FORWARD -i "${NAME}0" -o "${NAME}0" -j ACCEPT 2>/dev/null; }

net_up() {
    local i ns veth
    if ! has_link "${NAME}0"; then
        ip link add "${NAME}0" type bridge
        ip addr add "$SUBNET.1/24" dev "${NAME}0"
    fi
    ip link set "${NAME}0" up
    if command -v iptables >/dev/null 2>&1 && ! forward_rule -C && ! forward_rule -I; then
        echo "warning: could not let ${NAME}0's traffic through iptables' FORWARD chain; if nodes cannot reach" \
            "each other, check: iptables -S FORWARD" >&2
    fi
    for i in $(seq 1 "$NODES"); do
        ns="$NAME-node$i" veth="$NAME$i"
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        if ! has_link "$veth"; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            ip link set "$veth" master "${NAME}0" up
            ip -n "$ns" addr add "$SUBNET.1$i/24" dev eth0
            ip -n "$ns" link set lo up
            ip -n "$ns" link set eth0 up
            ip -n "$ns" route add default via "$SUBNET.1"
        fi
    done
    write_node_files
}

# slurmd for node<i> in its network namespace, plus a private mount namespace in which our hosts and
# resolv.conf are the node's, and a UTS namespace that makes `hostname` (and gloo's default address, which
# it finds by the hostname) node<i>; jobs inherit all three. Not `ip netns exec`: it remounts /sys, which
# drops /sys/fs/cgroup, and slurmd refuses to start without it.
start_node() {
    local i="$1"
    mkdir -p "$DIR/spool/node$i"
    # shellcheck disable=SC2016  # $1 and $2 are the inner sh's arguments
    nsenter --net="/run/netns/$NAME-node$i" unshare --mount --uts --propagation private sh -c \
        'mount --bind "$1/hosts" /etc/hosts && { [ ! -e /etc/resolv.conf ] || mount --bind "$1/resolv.conf" /etc/resolv.conf; } &&
            hostname "$2" && exec slurmd -f "$1/slurm.conf" -N "$2"' \
        sh "$DIR" "node$i" || {
        echo "error: slurmd for node$i did not start; see $DIR/slurmd-node$i.log" >&2
        exit 1
    }
}

net_down() {
    local i ns pids
    for i in $(seq 1 "$NODES"); do
        ns="$NAME-node$i"
        if [ -e "/run/netns/$ns" ]; then
            # job processes left behind would keep the namespace (and its eth0) alive after the delete
            for _ in $(seq 1 20); do
                pids="$(ip netns pids "$ns")"
                [ -n "$pids" ] || break
                xargs -r kill -9 <<<"$pids" 2>/dev/null || true
                sleep 0.25
            done
            ip netns del "$ns"
        fi
        # deleting the namespace deletes the pair, but maybe not yet: tolerate the race
        if has_link "$NAME$i"; then ip link del "$NAME$i" 2>/dev/null || true; fi
    done
    if command -v iptables >/dev/null 2>&1 && forward_rule -C; then forward_rule -D; fi
    if has_link "${NAME}0"; then ip link del "${NAME}0"; fi
    rm -f "$DIR/hosts" "$DIR/resolv.conf"
}

parse_nodes() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) NODES="${2:-}"; shift 2 || shift ;;
            --nodes=*) NODES="${1#--nodes=}"; shift ;;
            *) echo "error: unknown argument $1; usage: $0 up [--nodes N]" >&2; exit 2 ;;
        esac
    done
    # a node's address is <subnet>.1<i>, which fits a /24 up to 99 nodes
    [[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "error: --nodes must be 1..99, got '$NODES'" >&2; exit 2; }
}

stop() {
    if running "$1"; then
        kill "$(cat "$DIR/$1.pid")"
        for _ in $(seq 1 40); do running "$1" || break; sleep 0.25; done
    fi
    rm -f "$DIR/$1.pid"
}

up() {
    local rec want i logs
    parse_nodes "$@"
    need slurmctld
    need slurmd
    need munged
    if [ "$NODES" -gt 1 ]; then need ip iproute2; need nsenter util-linux; need unshare util-linux; fi
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR"
    rec="$(recorded)" want="$(layout)"
    if [ -n "$rec" ] && [ "$rec" != "$want" ]; then
        if running slurmctld; then
            echo "error: the cluster in $DIR is running with $(sed -n 's/^nodes=//p' <<<"$rec") node(s)" \
                "($(oneline <<<"$rec")), asked for $NODES ($(oneline <<<"$want")); run $0 down first" >&2
            exit 1
        fi
        # leftovers of the old layout go, and so does the job state of a cluster that no longer exists
        (down >/dev/null)
        rm -rf "$DIR/state" "$DIR/spool"
        mkdir -p "$DIR/state" "$DIR/spool"
        rm -f "$CONF"
    fi
    if ! running munged; then
        install -m 0600 /etc/munge/munge.key "$DIR/munge.key"
        munged --force -S "$DIR/munge.socket.2" --key-file="$DIR/munge.key" --log-file="$DIR/munged.log" \
            --pid-file="$DIR/munged.pid" --seed-file="$DIR/munged.seed"
    fi
    [ -f "$CONF" ] || write_conf
    export SLURM_CONF="$CONF"
    if [ "$NODES" -gt 1 ]; then net_up; fi
    running slurmctld || slurmctld -f "$CONF"
    if [ "$NODES" -gt 1 ]; then
        for i in $(seq 1 "$NODES"); do running "slurmd-node$i" || start_node "$i"; done
    else
        running slurmd || slurmd -f "$CONF"
    fi
    for _ in $(seq 1 60); do
        if [ "$(ready)" -eq "$NODES" ]; then
            echo "Slurm is up: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    logs="$(daemons | sed "s|.*|$DIR/&.log|" | tr '\n' ' ')"
    echo "error: Slurm did not become idle in 30 s; see $DIR/slurmctld.log and ${logs% }" >&2
    exit 1
}

down() {
    local daemon
    load_layout
    for daemon in $(daemons) slurmctld munged; do stop "$daemon"; done
    if [ "$NODES" -gt 1 ]; then net_down; fi
    echo "Slurm is down"
}

status() {
    local state=0 daemon n
    load_layout
    for daemon in munged slurmctld $(daemons); do
        if running "$daemon"; then echo "$daemon: running (pid $(cat "$DIR/$daemon.pid"))"; else echo "$daemon: stopped"; state=3; fi
    done
    if [ "$state" -eq 0 ]; then
        SLURM_CONF="$CONF" sinfo || state=3
        n="$(ready)"
        [ "$n" -eq "$NODES" ] || { echo "nodes: $n of $NODES up"; state=3; }
    fi
    return "$state"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    up) up "$@" ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
esac
