#!/usr/bin/env bash
# Start a one-node SLURM cluster (Debian's slurm-wlm + munge) on this machine, for the tests of
# the SLURM launcher. Idempotent: a running cluster is left as it is. No cgroups needed.
# Needs root (it installs packages and starts daemons); prints one line saying why when it cannot.
#   bash tests/slurm/start.sh          # start (install first if needed); exit 0 when sinfo shows the node idle
#   bash tests/slurm/start.sh --stop   # stop the daemons
set -euo pipefail

conf_dir=/etc/slurm
state_dir=/var/spool/slurm
log_dir=/var/log/slurm
node="$(hostname -s)"

if [ "${1:-}" = "--stop" ]; then
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "slurm: not started (needs root to install and start slurmctld/slurmd)"; exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if ! (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; }); then
    echo "slurm: not started (apt-get install slurm-wlm munge failed)"; exit 1
  fi
fi

# munge: the key and the daemon that authenticates every SLURM message
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge 2>/dev/null || true
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
if ! pgrep -x munged >/dev/null; then
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
fi

cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p "$conf_dir" "$state_dir/ctld" "$state_dir/d" "$log_dir"
conf="$conf_dir/slurm.conf"
wanted="$(cat <<CONF
# written by tests/slurm/start.sh: a one-node test cluster
ClusterName=selftpt-test
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$state_dir/ctld
SlurmdSpoolDir=$state_dir/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)"
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
  printf '%s\n' "$wanted" > "$conf"
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  sleep 1
fi

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd

for _ in $(seq 1 60); do
  state="$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mixed|allocated) exit 0 ;;
    down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
echo "slurm: not started (node state: ${state:-none}; see $log_dir/slurmctld.log and slurmd.log)"
exit 1
