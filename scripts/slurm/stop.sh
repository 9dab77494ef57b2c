#!/usr/bin/env bash
# Stop the single-node Slurm started by start.sh: slurmd, slurmctld and its own munged, in reverse order, by the
# PIDs in the pid files start.sh's daemons wrote under $AUGBENCH_SLURM_DIR (never by process name, never a
# system pid file: other Slurm and munge daemons on the machine are not ours).
set -uo pipefail
DIR=${AUGBENCH_SLURM_DIR:-/tmp/augbench-slurm}
stop() {
    local pidfile=$1
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
stop "$DIR/munge/munged.pid"
echo "slurm: stopped"
