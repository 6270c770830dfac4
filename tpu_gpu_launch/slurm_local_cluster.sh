#!/bin/bash
# A one-node SLURM cluster on this machine, for testing slurm.sbatch (tests/test_slurm.py;
# .ci/run calls this, then runs `pytest -m slurm`). Needs root and Debian / Ubuntu packages.
#
#   sudo tpu_gpu_launch/slurm_local_cluster.sh        # idempotent: starts what is not running
#
# Installs munge, slurmctld, slurmd and slurm-client with apt if they are missing, writes a
# minimal /etc/slurm/slurm.conf for this host (its CPUs and memory as `slurmd -C` detects
# them; no cgroups: proctrack/linuxproc, task/none; KillWait=5 so a stopped step is
# SIGKILLed 5 s after its SIGTERM), starts munged (as the munge user), slurmctld and slurmd,
# and waits until `sinfo` shows the node idle. A slurm.conf not written by this script is
# left alone (FORCE=1 replaces it).
set -euo pipefail
MARK="# written by jaxcourse tpu_gpu_launch/slurm_local_cluster.sh"
CONF=/etc/slurm/slurm.conf

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_local_cluster.sh: needs root (it installs packages and starts daemons)" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  echo "+ apt-get install munge slurmctld slurmd slurm-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
fi

# munge: the key, its directories, the daemon (as the munge user).
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null

# slurm.conf for this one host.
host=$(hostname -s)
node=$(slurmd -C | grep -m1 '^NodeName=' | sed 's/ UpTime=.*//')
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${FORCE:-0}" != "1" ]; then
  echo "slurm_local_cluster.sh: $CONF exists and was not written by this script;" \
       "keeping it (FORCE=1 replaces it)" >&2
else
  install -d /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=jaxcourse
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=5
MinJobAge=300
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
fi

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
  state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) echo "slurm: node $host $state"; sinfo; exit 0 ;;
    down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm_local_cluster.sh: node $host not idle after 60 s (state: ${state:-none});" \
     "see /var/log/slurm/" >&2
exit 1
