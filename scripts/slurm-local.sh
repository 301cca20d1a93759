#!/usr/bin/env bash
# A private single-node Slurm on localhost, for trying the sbatch scripts in slurm/ and for
# `make test-slurm`. Everything (slurm.conf, state, spool, logs, pid files) lives in $ITERIS_SLURM_DIR
# (default /tmp/iteris-slurm); /etc/slurm is not touched, so clients need SLURM_CONF (see `env`).
#
# usage: scripts/slurm-local.sh up|down|status|env
#   up      write slurm.conf, start munged (unless one is running), slurmctld and slurmd, wait until
#           the node is idle; prints the `export SLURM_CONF=...` line to use. Safe to repeat.
#   down    cancel this cluster's jobs, then stop the daemons that `up` started, by their pids
#           (never by name); a munged that was already running is left alone.
#   status  the daemons and sinfo;   env   print `export SLURM_CONF=...` (eval "$(... env)")
# environment: ITERIS_SLURM_DIR, ITERIS_SLURM_CPUS (CPUs the node claims, default 4: the 2-core dev
#   machine runs 4 ranks oversubscribed), ITERIS_SLURM_PORT (slurmctld port, default 6817; slurmd +1).
# Needs root (slurmd launches jobs) and slurm-wlm + munge (scripts/install-deps.sh --slurm).
# Notes: Debian's Open MPI works under srun only with --mpi=pmix (MpiDefault=pmix below); there is no
# accounting (use `scontrol show job ID`, not sacct).
set -euo pipefail

DIR=${ITERIS_SLURM_DIR:-/tmp/iteris-slurm}
CPUS=${ITERIS_SLURM_CPUS:-4}
PORT=${ITERIS_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
STARTED=$DIR/started   # lines "NAME PID" for the daemons this script started
MUNGE_PID=/run/munge/munged.pid

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -s "$1" ] && cat "$1" 2>/dev/null || true; }
# gone PID [TENTHS]: wait until PID has exited
gone() { local i; for i in $(seq "${2:-100}"); do alive "$1" || return 0; sleep 0.1; done; return 1; }

write_conf() {
  local user mem
  user=$(id -un)
  mem=$(awk '/MemTotal/ { m = int($2 / 1024 * 0.8); print (m > 20000 ? 20000 : m) }' /proc/meminfo)
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
# written by scripts/slurm-local.sh: a private single-node cluster on localhost
ClusterName=iteris-local
SlurmctldHost=localhost
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MailProg=/bin/true
KillWait=10
MinJobAge=300
MaxArraySize=1001
SchedulerParameters=sched_interval=2
PlugStackConfig=$DIR/plugstack.conf
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  : >"$DIR/plugstack.conf"
}

record() { echo "$1 $2" >>"$STARTED"; }

up() {
  [ "$(id -u)" -eq 0 ] || die "run as root (slurmd must be able to start jobs)"
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged; do
    [ -x "$b" ] || die "$b is missing: run scripts/install-deps.sh --slurm"
  done
  mkdir -p "$DIR"
  touch "$STARTED"
  # forget recorded daemons that are gone (a crash, a reboot), so `down` never signals a reused pid
  local keep; keep=$(while read -r n p; do alive "$p" && echo "$n $p"; done <"$STARTED" || true)
  printf '%s' "${keep:+$keep
}" >"$STARTED"
  local ctld sd mg i
  ctld=$(pid_of "$DIR/slurmctld.pid"); sd=$(pid_of "$DIR/slurmd.pid")
  if ! alive "$ctld" && ! alive "$sd"; then
    if ss -ltn 2>/dev/null | awk '{ print $4 }' | grep -Eq ":($PORT|$((PORT + 1)))\$"; then
      die "port $PORT or $((PORT + 1)) is in use (another Slurm?): set ITERIS_SLURM_PORT"
    fi
    write_conf
  fi

  # munge: reuse a running munged (the system's), else start one and remember that we did
  if ! munge -n >/dev/null 2>&1; then
    mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
      dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
      chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    for i in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
    mg=$(pid_of "$MUNGE_PID"); [ -n "$mg" ] && record munged "$mg"
    say "started munged (pid $mg)"
  fi

  if ! alive "$ctld"; then
    /usr/sbin/slurmctld -c -f "$CONF"
    for i in $(seq 50); do ctld=$(pid_of "$DIR/slurmctld.pid"); alive "$ctld" && break; sleep 0.1; done
    alive "$ctld" || die "slurmctld did not start: see $DIR/log/slurmctld.log"
    record slurmctld "$ctld"; say "started slurmctld (pid $ctld)"
  fi
  if ! alive "$sd"; then
    /usr/sbin/slurmd -f "$CONF" -N localhost
    for i in $(seq 50); do sd=$(pid_of "$DIR/slurmd.pid"); alive "$sd" && break; sleep 0.1; done
    alive "$sd" || die "slurmd did not start: see $DIR/log/slurmd.log"
    record slurmd "$sd"; say "started slurmd (pid $sd)"
  fi
  local st=""
  for i in $(seq 150); do
    st=$(SLURM_CONF=$CONF timeout 5 sinfo -h -o %T 2>/dev/null || true)
    [ "$st" = idle ] || [ "$st" = mixed ] || [ "$st" = allocated ] && break
    sleep 0.2
  done
  case "$st" in
    idle | mixed | allocated) ;;
    *) die "node state is '$st' after 30 s, not idle: see $DIR/log/slurmd.log and slurmctld.log" ;;
  esac
  SLURM_CONF=$CONF sinfo
  echo "export SLURM_CONF=$CONF"
}

down() {
  [ -f "$STARTED" ] || { say "nothing started from $DIR"; return 0; }
  local name pid
  if grep -q '^slurmctld ' "$STARTED" && alive "$(awk '$1 == "slurmctld" { print $2 }' "$STARTED" | tail -n 1)"; then
    SLURM_CONF=$CONF timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
  fi
  # slurmd first (it ends its job steps), then slurmctld, then munged; TERM, then KILL after 10 s
  for name in slurmd slurmctld munged; do
    for pid in $(awk -v n="$name" '$1 == n { print $2 }' "$STARTED"); do
      alive "$pid" || continue
      kill "$pid" 2>/dev/null || true
      gone "$pid" 100 || { say "$name (pid $pid) ignored TERM: KILL"; kill -9 "$pid" 2>/dev/null || true; gone "$pid" 20 || true; }
      say "stopped $name (pid $pid)"
    done
  done
  rm -f "$STARTED"
}

status() {
  local n p
  for n in slurmctld slurmd; do
    p=$(pid_of "$DIR/$n.pid")
    if alive "$p"; then echo "$n: running (pid $p)"; else echo "$n: not running"; fi
  done
  if munge -n >/dev/null 2>&1; then echo "munged: running (pid $(pid_of "$MUNGE_PID"))"; else echo "munged: not running"; fi
  [ -f "$STARTED" ] && { echo "started by this script:"; sed 's/^/  /' "$STARTED"; }
  [ -f "$CONF" ] && SLURM_CONF=$CONF timeout 5 sinfo 2>/dev/null || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  -h | --help | help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "usage: $0 up|down|status|env (--help)" >&2; exit 2 ;;
esac
