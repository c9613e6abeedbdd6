#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for testing the SLURM profile where CI runs.
#   tests/slurm/cluster.sh start DIR   (prints `export SLURM_CONF=...` lines to eval)
#   tests/slurm/cluster.sh stop DIR
# Needs root and Debian's slurmctld slurmd slurm-client munge (installed by .ci/run).
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")

stop() {
    for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    pkill -f "slurmstepd.*$dir" 2>/dev/null || true
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$dir/slurm.conf" ]; then rm -f /etc/slurm/slurm.conf; fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi

mkdir -p "$dir"/{state,spool,munge}
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=moralign-test
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue (the status command used here) for an hour
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP
CONF

# munge: a fresh key and socket of our own
dd if=/dev/urandom bs=1 count=1024 of="$dir/munge/munge.key" 2>/dev/null
chmod 400 "$dir/munge/munge.key"
mkdir -p /run/munge
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"
export SLURM_CONF=$dir/slurm.conf
# slurm's munge plugin finds the socket through this option of the conf
echo "AuthInfo=socket=$dir/munge/munge.socket" >> "$SLURM_CONF"
# jobs' own srun calls read the default path: point it at this cluster (never over a real configuration)
mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" != "$SLURM_CONF" ]; then
    echo "/etc/slurm/slurm.conf exists and is not this test cluster's; refusing to replace it" >&2
    stop
    exit 1
fi
ln -sf "$SLURM_CONF" /etc/slurm/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed"; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "SLURM did not come up; see $dir/*.log" >&2
stop
exit 1
