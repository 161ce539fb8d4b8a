# ruff: noqa: E501  (embedded shell script)
"""The small shell glue between systemd and restic, installed as /usr/local/sbin/selfhost-backup.

It only sequences restic calls: consistency hooks, stopping units briefly, backup, forget
--prune, check, the late-backup check, the failure alert and restore. Passwords never appear
on a command line: restic reads RESTIC_PASSWORD_FILE.
"""

GLUE = r"""#!/bin/bash
# Managed by selfhost: changes here are overwritten on the next deploy.
# Glue between systemd and restic (selfhost/backup). Usage:
#   selfhost-backup run REPO | forget REPO | check REPO | late | alert UNIT | status
#   selfhost-backup restore REPO SNAPSHOT TARGET_DIR [PATH...]
#   selfhost-backup paths SERVICE          (data paths of a service)
#   selfhost-backup restic REPO ARGS...    (restic with the repository's settings)
set -euo pipefail
umask 077
CONF=/etc/selfhost/backup
STATE=/var/lib/selfhost-backup
export LC_ALL=C

log() {  # log PRIORITY MESSAGE: to the journal with that priority, and to stderr
  local prio=$1; shift
  echo "$*" | systemd-cat -t selfhost-backup -p "$prio" 2>/dev/null || true
  echo "selfhost-backup: $*" >&2
}

alert_hooks() {  # alert_hooks SUBJECT BODY: the hook for mail and other notifications
  local h
  for h in "$CONF"/alert.d/*; do
    [ -x "$h" ] || continue
    "$h" "$1" "$2" || log warning "alert hook $h failed"
  done
}

load() {
  repo=$1
  if ! grep -qx -- "$repo" "$CONF/repositories" 2>/dev/null; then
    echo "selfhost-backup: unknown repository '$repo' (see $CONF/repositories)" >&2; exit 2
  fi
  set -a; . "$CONF/$repo.env"; set +a
  if [ -n "${SELFHOST_REST_PASSWORD_FILE:-}" ]; then
    # Credentials go into restic's environment only (readable by root alone), never argv.
    RESTIC_REPOSITORY="rest:${SELFHOST_REST_SCHEME}://${SELFHOST_REST_USER}:$(head -n1 "$SELFHOST_REST_PASSWORD_FILE")@${SELFHOST_REST_REST}"
    export RESTIC_REPOSITORY
  fi
  opts=()
  if [ -n "${SELFHOST_SFTP_COMMAND:-}" ]; then opts+=(-o "sftp.command=$SELFHOST_SFTP_COMMAND"); fi
}

r() {
  local rc=0
  restic "${opts[@]}" "$@" || rc=$?
  if [ -n "${SELFHOST_SFTP_COMMAND:-}" ]; then
    # restic does not always wait for its sftp `ssh` child (forget, errors): it exits a
    # moment later, orphaned. Wait for it (at most 10 s), so that this unit ends with no
    # process left behind (on cgroup v1, systemd may miss such a straggler's exit and
    # wait for its stop timeout).
    local i
    for i in $(seq 100); do
      pgrep -f -- "ssh -F $CONF/$repo.ssh_config " >/dev/null || break
      sleep 0.1
    done
  fi
  return "$rc"
}

restart_units() {
  local u
  for u in ${stopped:-}; do systemctl start "$u" || log err "could not start $u again"; done
  stopped=
}

cmd_run() {
  load "$1"
  exec 9>/run/selfhost-backup.lock
  flock 9
  mkdir -p "$STATE"
  if [ ! -e "$STATE/$repo.initialized" ]; then
    # Only ever initialise once: a repository that later disappears (unmounted disk,
    # wrong host) is an error, never silently replaced by an empty one.
    if ! r cat config >/dev/null 2>&1; then r init; fi
    date +%s > "$STATE/$repo.initialized"
  fi
  if [ -s "$CONF/pre-backup.sh" ]; then
    log info "running consistency hooks ($CONF/pre-backup.sh)"
    /bin/sh -eu "$CONF/pre-backup.sh"
  fi
  local list u
  list=$(mktemp)
  while IFS= read -r p; do
    [ -n "$p" ] || continue
    if [ -e "$p" ]; then echo "$p" >> "$list"; else log warning "not backed up (missing): $p"; fi
  done < "$CONF/include.txt"
  stopped=
  trap restart_units EXIT
  while IFS= read -r u; do
    [ -n "$u" ] || continue
    if systemctl is-active -q "$u"; then systemctl stop "$u"; stopped="$stopped $u"; fi
  done < "$CONF/stop-units.txt"
  r backup --tag selfhost --files-from-verbatim "$list" --exclude-file "$CONF/exclude.txt" \
    ${SELFHOST_BACKUP_TIME:+--time "$SELFHOST_BACKUP_TIME"}
  restart_units
  rm -f "$list"
  date +%s > "$STATE/$repo.last-success"
  log info "backup to $repo done"
  forget
}

forget() {  # the repository's retention policy, on this host's snapshots (after each backup)
  log info "forgetting snapshots of $repo by retention: $SELFHOST_FORGET"
  # shellcheck disable=SC2086 # the retention flags are words
  r forget --tag selfhost --host "$(hostname)" --group-by host,tags --prune $SELFHOST_FORGET
}

cmd_forget() {
  load "$1"
  exec 9>/run/selfhost-backup.lock
  flock 9
  forget
}

cmd_check() {
  load "$1"
  r check --read-data-subset="$SELFHOST_CHECK_SUBSET"
}

cmd_late() {
  local rc=0 now last limit age name
  now=$(date +%s)
  while IFS= read -r name; do
    [ -n "$name" ] || continue
    ( load "$name"
      last=$(cat "$STATE/$name.last-success" 2>/dev/null || cat "$STATE/$name.since" 2>/dev/null || echo "$now")
      limit=$SELFHOST_MAX_AGE_HOURS
      age=$(( (now - last) / 3600 ))
      if [ "$age" -ge "$limit" ]; then
        msg="backup to repository $name is late: last success $age hours ago (limit $limit h)"
        [ -e "$STATE/$name.last-success" ] || msg="backup to repository $name is late: no successful backup for $age hours (limit $limit h)"
        log err "$msg"
        alert_hooks "[$(hostname)] backup late: $name" "$msg"
        exit 1
      fi ) || rc=1
  done < "$CONF/repositories"
  return $rc
}

cmd_alert() {
  local unit=$1 msg
  msg="$unit failed on $(hostname); see: journalctl -u $unit"
  log err "$msg"
  alert_hooks "[$(hostname)] backup failed: $unit" "$msg"
}

cmd_status() {
  # One line per repository: name, seconds since epoch now, last-success stamp, then
  # restic's JSON of the latest snapshot (or an error text). Parsed by `selfhost backup-status`.
  local name
  while IFS= read -r name; do
    [ -n "$name" ] || continue
    ( load "$name"
      stamp=$(cat "$STATE/$name.last-success" 2>/dev/null || echo -)
      if out=$(r snapshots --json --latest 1 --tag selfhost --host "$(hostname)" 2>&1); then
        printf '%s\t%s\t%s\tok\t%s\n' "$name" "$(date +%s)" "$stamp" "$(echo "$out" | tr -d '\n')"
      else
        printf '%s\t%s\t%s\terror\t%s\n' "$name" "$(date +%s)" "$stamp" "$(echo "$out" | tail -n1)"
      fi ) || true
  done < "$CONF/repositories"
}

cmd_restore() {
  local snap=$2 target=$3 inc=() p
  load "$1"
  shift 3
  for p in "$@"; do inc+=(--include "$p"); done
  mkdir -p "$target"
  log info "restoring snapshot $snap of $repo to $target ${*:-(everything)}"
  r restore "$snap" --target "$target" "${inc[@]}"
}

cmd_paths() {
  awk -F '\t' -v s="$1" '$1 == s { print $2 }' "$CONF/services.txt"
}

sub=${1:-}; shift || true
case "$sub" in
  run) cmd_run "$@" ;;
  check) cmd_check "$@" ;;
  forget) cmd_forget "$@" ;;
  late) cmd_late ;;
  alert) cmd_alert "$@" ;;
  status) cmd_status ;;
  restore) [ $# -ge 3 ] || { echo "usage: selfhost-backup restore REPO SNAPSHOT TARGET [PATH...]" >&2; exit 2; }
           cmd_restore "$@" ;;
  paths) cmd_paths "$@" ;;
  restic) load "$1"; shift; r "$@" ;;
  *) sed -n '3,7p' "$0" >&2; exit 2 ;;
esac
"""
