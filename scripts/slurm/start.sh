#!/usr/bin/env bash
# Start a single-node Slurm on this machine: munged, slurmctld, slurmd, with a fake GPU (gres gpu:1 on
# /dev/null) and two partitions, `cpu` (default) and `gpu`. For tests and CI; needs root.
#
# State, spool, logs and pid files live under $AUGBENCH_SLURM_DIR (default /tmp/augbench-slurm); the
# config is written to /etc/slurm/ where sbatch and squeue find it. Starting twice is safe: a running
# cluster started by this script is left alone. Stop it with stop.sh (by the daemons' own PIDs).
set -euo pipefail
DIR=${AUGBENCH_SLURM_DIR:-/tmp/augbench-slurm}
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    echo "slurm: already running (pids $(cat "$DIR/slurmctld.pid") $(cat "$DIR/slurmd.pid"))"
    exit 0
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( MEM * 95 / 100 ))  # the whole RealMemory drains the node when the kernel reports a little less
cat > /etc/slurm/slurm.conf <<CONF
# Written by augbench scripts/slurm/start.sh: a single-node test cluster with a fake GPU.
ClusterName=augbench
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
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
# 10). Snakemake's Slurm plugin runs `scontrol show config` when it is imported, i.e. in every snakemake
# command once this file exists, also after stop.sh: 3 makes that 2 s. Loopback RPCs need far less.
MessageTimeout=3
ReturnToService=2
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
GresTypes=gpu
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${HOST} MaxTime=INFINITE State=UP
CONF
# Without File= slurmd drops the GPU and the node drains.
echo "Name=gpu File=/dev/null Count=1" > /etc/slurm/gres.conf

mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
if ! alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
fi
slurmctld
slurmd
for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
    case "$state" in
        idle*) echo "slurm: node ${HOST} idle (${CPUS} CPUs, ${MEM} MB, gpu:1 fake)"; exit 0 ;;
        drain*|down*) scontrol update NodeName="${HOST}" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm: node did not become idle; last state '${state:-none}', see ${DIR}/log/" >&2
exit 1
