#!/usr/bin/env bash
# A real two-node SLURM cluster on loopback for tests, CI and developers: local_slurm.sh start|stop|status.
# Installs Debian's slurm-wlm and munge if missing, writes a munge key and a slurm.conf under $STATE,
# starts munged, slurmctld and one slurmd per node (n1, n2), then waits until sinfo shows both idle.
set -euo pipefail

STATE=${TRIARCH_SLURM_DIR:-/var/tmp/triarch-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)
NODES=(n1 n2)
PORTS=(17011 17012)

need_packages() {
  command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log" /etc/munge /run/munge /var/log/munge /var/lib/munge
  local cpus=1
  cat >"$CONF" <<EOF
ClusterName=triarch
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/spool/%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
SlurmdTimeout=20
MessageTimeout=10
KillWait=5
MinJobAge=3600
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$cpus State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mkdir -p "$STATE/spool/${NODES[0]}" "$STATE/spool/${NODES[1]}"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
      su -s /bin/sh munge -c munged 2>/dev/null || munged --force
    else
      munged --force
    fi
  fi
}

wait_idle() {
  for _ in $(seq 1 60); do
    local idle
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)
    if [ "$idle" -ge ${#NODES[@]} ]; then
      sinfo -N
      return 0
    fi
    sleep 1
  done
  echo "local_slurm: nodes did not become idle; logs in $STATE/log" >&2
  sinfo -N >&2 || true
  tail -n 20 "$STATE"/log/*.log >&2 || true
  return 1
}

# pid files of the daemons this cluster started (SlurmctldPidFile, SlurmdPidFile in slurm.conf)
ctld_pidfile() { echo "$STATE/slurmctld.pid"; }
slurmd_pidfile() { echo "$STATE/spool/$1.pid"; }

# the pid in a pid file when that process is alive and is the named daemon, else nothing
own_pid() {
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    echo "$pid"
  fi
}

# refuse to start beside a SLURM this script did not start (a real cluster's node, another test cluster)
check_no_foreign_slurm() {
  local ours foreign pid
  ours=$(own_pid "$(ctld_pidfile)" slurmctld)
  foreign=""
  for pid in $(pgrep -x slurmctld || true); do
    [ "$pid" = "$ours" ] || foreign="$foreign $pid"
  done
  if [ -n "$foreign" ]; then
    echo "local_slurm: error: a slurmctld this script did not start is running (pid$foreign); not starting a test cluster beside it (state $STATE)" >&2
    exit 3
  fi
  if [ -z "$ours" ] && env -u SLURM_CONF sinfo -h >/dev/null 2>&1; then
    echo "local_slurm: error: a SLURM cluster already answers here (sinfo with the system config works); not starting a test cluster beside it" >&2
    exit 3
  fi
}

start() {
  need_packages
  check_no_foreign_slurm
  write_conf
  start_munge
  if [ -z "$(own_pid "$(ctld_pidfile)" slurmctld)" ]; then
    slurmctld -f "$CONF" -i  # -i: ignore state files left by an earlier cluster
  fi
  for node in "${NODES[@]}"; do
    if [ -z "$(own_pid "$(slurmd_pidfile "$node")" slurmd)" ]; then
      slurmd -f "$CONF" -N "$node"
    fi
  done
  wait_idle
  echo "export SLURM_CONF=$CONF"
}

# stop only the daemons this cluster started (their pid files), never others of the same name
stop() {
  local pids="" pid node
  pid=$(own_pid "$(ctld_pidfile)" slurmctld); [ -n "$pid" ] && pids="$pids $pid"
  for node in "${NODES[@]}"; do
    pid=$(own_pid "$(slurmd_pidfile "$node")" slurmd); [ -n "$pid" ] && pids="$pids $pid"
  done
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    local alive=""
    for pid in $pids; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ -n "$alive" ] || break
    sleep 0.5
  done
}

status() {
  if [ -z "$(own_pid "$(ctld_pidfile)" slurmctld)" ]; then
    echo "local_slurm: not running"
    return 1
  fi
  sinfo -N
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
