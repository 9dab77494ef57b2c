#!/usr/bin/env bash
# Start a single-node Slurm on this machine for tests and CI: its own munged, slurmctld and slurmd, with a fake
# GPU (gres gpu:1 on /dev/null) and two partitions, `cpu` (default) and `gpu`. Needs root.
#
# Everything lives under $AUGBENCH_SLURM_DIR (default /tmp/augbench-slurm): slurm.conf and gres.conf in etc/
# (clients find them through SLURM_CONF=$AUGBENCH_SLURM_DIR/etc/slurm.conf, which this script prints, or through
# the client wrappers in $AUGBENCH_SLURM_DIR/bin, which set it), state,
# spool, logs and pid files, and a munge daemon with its own key, socket and pid file. Nothing under /etc or
# /run is written and no daemon this script did not start is touched, so a machine's own Slurm and munge are
# left as they are. Starting twice is safe: a running cluster started here is left alone. Stop with stop.sh.
set -euo pipefail
DIR=${AUGBENCH_SLURM_DIR:-/tmp/augbench-slurm}
CONF="$DIR/etc/slurm.conf"
MUNGE="$DIR/munge"
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$MUNGE/munged.pid"; then
    [ -d "$DIR/bin" ] || { echo "slurm: $DIR/bin missing; stop and start again" >&2; exit 1; }
    echo "slurm: already running (pids $(cat "$DIR/slurmctld.pid") $(cat "$DIR/slurmd.pid")); SLURM_CONF=$CONF"
    exit 0
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/etc" "$MUNGE"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( MEM * 95 / 100 ))  # the whole RealMemory drains the node when the kernel reports a little less

# munge: a daemon of our own (key, socket, pid, log, seed in $MUNGE), run as the munge user as munged requires
chown munge:munge "$MUNGE"
chmod 0755 "$MUNGE"
if [ ! -f "$MUNGE/munge.key" ]; then
    dd if=/dev/urandom bs=1 count=1024 of="$MUNGE/munge.key" 2>/dev/null
    chown munge:munge "$MUNGE/munge.key"
    chmod 0400 "$MUNGE/munge.key"
fi
if ! alive "$MUNGE/munged.pid"; then
    rm -f "$MUNGE/munge.socket.2" "$MUNGE/munge.socket.2.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE/munge.socket.2" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
fi

cat > "$CONF" <<CONF
# Written by augbench scripts/slurm/start.sh: a single-node test cluster with a fake GPU.
ClusterName=augbench
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=${MUNGE}/munge.socket.2
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
# A client that cannot reach the controller gives up after MessageTimeout - 1 s (measured: 9 s at the default
# 10). Snakemake's Slurm plugin runs `scontrol show config` when it is imported: 3 makes that 2 s. Loopback RPCs
# need far less.
MessageTimeout=3
ReturnToService=2
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
PlugStackConfig=${DIR}/etc/plugstack.conf
GresTypes=gpu
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${HOST} MaxTime=INFINITE State=UP
CONF
# Without File= slurmd drops the GPU and the node drains. slurmd reads gres.conf beside slurm.conf.
echo "Name=gpu File=/dev/null Count=1" > "$DIR/etc/gres.conf"
: > "$DIR/etc/plugstack.conf"  # no SPANK plugins (the site's plugstack.conf is not ours to load)

# Client wrappers that carry the configuration: Snakemake's jobstep plugin strips SLURM_* variables (SLURM_CONF
# too) before the srun inside each job, which would then read the machine's /etc/slurm. With $DIR/bin first on
# PATH (exported into the jobs), every client of this cluster finds its own configuration.
mkdir -p "$DIR/bin"
for tool in sbatch srun squeue scontrol scancel sinfo sacct; do
    real=$(command -v "$tool" || true)
    [ -n "$real" ] || continue
    printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$CONF" "$real" > "$DIR/bin/$tool"
    chmod 0755 "$DIR/bin/$tool"
done

export SLURM_CONF="$CONF"
# -c: a fresh controller state: jobs of an earlier, killed test run must not keep the node allocated
alive "$DIR/slurmctld.pid" || slurmctld -c -f "$CONF"
alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
    case "$state" in
        idle*) echo "slurm: node ${HOST} idle (${CPUS} CPUs, ${MEM} MB, gpu:1 fake); SLURM_CONF=$CONF"; exit 0 ;;
        drain*|down*) scontrol update NodeName="${HOST}" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm: node did not become idle; last state '${state:-none}', see ${DIR}/log/ and ${MUNGE}/munged.log" >&2
exit 1
