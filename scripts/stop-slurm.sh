#!/usr/bin/env bash
# Stop exactly the daemons scripts/start-slurm.sh started (pid files in $CELLBG_SLURM_DIR/run),
# after cancelling leftover jobs so no slurmstepd outlives slurmd. Idempotent; the packages,
# state and logs are kept.
set -uo pipefail
if [ "$(id -u)" -ne 0 ]; then echo "stop-slurm: needs root" >&2; exit 1; fi
RUN=${CELLBG_SLURM_DIR:-/tmp/cellbg-slurm}/run
alive() {  # alive PIDFILE NAME: live, non-zombie process called NAME
  local p; p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] &&
    ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null
}
stopd() {  # stopd NAME: SIGTERM, wait up to 30 s, then SIGKILL
  local f=$RUN/$1.pid p
  if ! alive "$f" "$1"; then rm -f "$f"; return 0; fi
  p=$(cat "$f"); echo "stop-slurm: stopping $1 (pid $p)"; kill -TERM "$p"
  for _ in $(seq 60); do alive "$f" "$1" || break; sleep 0.5; done
  if alive "$f" "$1"; then echo "stop-slurm: $1 ignored SIGTERM, killing"; kill -KILL "$p"; fi
  rm -f "$f"
}
if alive "$RUN/slurmctld.pid" slurmctld; then
  squeue -h -o %u 2>/dev/null | sort -u | xargs -r -n1 scancel -u
  for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
for d in slurmd slurmctld munged; do stopd "$d"; done
echo "stop-slurm: stopped"
