# ruff: noqa: E501  (embedded shell script)
"""The daily check on the server itself: the on-host part of ``selfhost check``.

A systemd timer runs ``/usr/local/sbin/selfhost-check`` every day. It compares the managed
files and units with what the last deploy installed (``/etc/selfhost/check/expected.tsv``,
written by the compiler from the plan: each non-secret file's sha1, mode and owner; a secret
file's mode and owner only; each backup repository's largest age), and reads the health facts
(failed units, disks and inodes, pending reboot, late backups). Findings go to the journal; when something changed for the worse since the
previous run (a finding that was not there yesterday), the admin gets a mail through the
``sendmail`` role if a module provides it -- not every day the same news. The full check,
with diffs and service health checks, is ``selfhost check`` from the deploying machine.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from selfhost.compose.module import Contribution, Env, Module
from selfhost.compose.requests import Request
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import StrictModel

SCRIPT = "/usr/local/sbin/selfhost-check"
EXPECTED = "/etc/selfhost/check/expected.tsv"
STATE_DIR = "/var/lib/selfhost/check"
SERVICE = "/etc/systemd/system/selfhost-check.service"
TIMER = "/etc/systemd/system/selfhost-check.timer"


class HostCheck(StrictModel, Module):
    """A daily check on the server: drift from the last deploy and health, mailed to the admin
    when it gets worse."""

    uses: ClassVar[tuple[type[Request], ...]] = ()

    enabled: bool = Field(default=True, description="Run the daily check on the server.")
    schedule: str = Field(default="daily", pattern=r"^[A-Za-z0-9*,.:/~ -]+$",
                          description="When (systemd OnCalendar=).")
    disk_percent: int = Field(default=85, ge=50, le=99,
                              description="Warn when a filesystem's blocks or inodes are used "
                              "above this percentage.")

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        if not self.enabled:
            return c
        c.directories += [ManagedDir("/etc/selfhost", "0755"), ManagedDir("/etc/selfhost/check",
                                                                           "0755"),
                          ManagedDir(STATE_DIR, "0700")]
        mail = "1" if env.has_sendmail() else ""
        c.files.append(ManagedFile(SCRIPT, script(self.disk_percent, mail), mode="0755",
                                   validate="bash -n {path}"))
        c.files.append(ManagedFile(SERVICE, "[Unit]\nDescription=selfhost: daily check of the "
                                   "server against its model\n\n[Service]\nType=oneshot\n"
                                   # Findings are the script's report, not a failed unit
                                   # (which the next check would report again).
                                   "SuccessExitStatus=1 2\n"
                                   f"ExecStart={SCRIPT}\n"))
        c.files.append(ManagedFile(TIMER, "[Unit]\nDescription=selfhost: daily check\n\n"
                                   f"[Timer]\nOnCalendar={self.schedule}\nRandomizedDelaySec=1h\n"
                                   "Persistent=true\n\n[Install]\nWantedBy=timers.target\n",
                                   validate="systemd-analyze calendar \"$(sed -n "
                                   "'s/^OnCalendar=//p' {path})\" >/dev/null"))
        c.commands.append(Command("check: reload systemd units", "systemctl daemon-reload",
                                  on_change=(SERVICE, TIMER)))
        c.units.append(Unit("selfhost-check.timer", reload_on=(TIMER,), reload=False))
        return c


def expected_tsv(rows: list[tuple[str, ...]]) -> str:
    """``F path sha1 mode owner group`` / ``M path mode owner group`` / ``U unit`` /
    ``B repository max_age_hours`` lines."""
    head = "# Managed by selfhost: what the last deploy installed (for selfhost-check).\n"
    return head + "".join("\t".join(r) + "\n" for r in rows)


def script(disk_percent: int, mail: str) -> str:
    from selfhost.backup.restic import STATE as BACKUPS

    return (SCRIPT_TEXT.replace("@DISK@", str(disk_percent)).replace("@MAIL@", mail)
            .replace("@BACKUPS@", BACKUPS))


SCRIPT_TEXT = r"""#!/bin/bash
# Managed by selfhost: the daily on-host check (see selfhost/hostcheck.py). Prints one
# finding a line (SEVERITY<TAB>AREA<TAB>WHAT), logs them, and mails the admin the findings
# that were not there at the previous run. Exit status: 0 all good, 1 warnings, 2 errors.
set -uo pipefail
export LC_ALL=C
expected=/etc/selfhost/check/expected.tsv
state=/var/lib/selfhost/check
backups=@BACKUPS@
disk=@DISK@
mail=@MAIL@
umask 077
mkdir -p "$state"
{
  while IFS=$'\t' read -r kind a b c d e; do
    case $kind in
      F)
        if [ ! -f "$a" ]; then printf 'error\tdrift\t%s is missing\n' "$a"; continue; fi
        [ "$(sha1sum < "$a" | cut -c1-40)" = "$b" ] \
          || printf 'error\tdrift\t%s differs from the model\n' "$a"
        m=$(stat -c '%a %U %G' "$a")
        [ "$m" = "$c $d $e" ] || printf 'error\tdrift\t%s is %s, the model says %s\n' "$a" "$m" "$c $d $e" ;;
      M)
        if [ ! -f "$a" ]; then printf 'error\tdrift\t%s is missing\n' "$a"; continue; fi
        m=$(stat -c '%a %U %G' "$a")
        [ "$m" = "$b $c $d" ] || printf 'error\tdrift\t%s is %s, the model says %s\n' "$a" "$m" "$b $c $d" ;;
      U)
        systemctl is-active -q "$a" || printf 'error\tdrift\tunit %s is not running\n' "$a" ;;
      B)
        # A backup repository ($a) whose last success (else the start of its backups) is
        # $b hours old or more. The text stays the same from day to day: mailed once.
        last=$(cat "$backups/$a.last-success" 2>/dev/null || cat "$backups/$a.since" 2>/dev/null)
        if [ -n "$last" ] && [ $(( ($(date +%s) - last) / 3600 )) -ge "$b" ]; then
          printf 'error\thealth\tbackup to repository %s is late (no success for %s hours or more)\n' "$a" "$b"
        fi ;;
    esac
  done < <(grep -v '^#' "$expected")
  systemctl --failed --plain --no-legend --no-pager 2>/dev/null \
    | awk '{printf "error\thealth\tunit %s has failed\n", $1}'
  df --output=target,pcent,ipcent -x devtmpfs 2>/dev/null | tail -n +2 \
    | tr -d % | awk -v max="$disk" '$1 !~ /^\/(dev|run|sys|proc)(\/|$)/ && ($2 >= max || $3 >= max) {
        printf "warning\thealth\t%s is %s%% full (%s%% of its inodes)\n", $1, $2, $3}'
  [ -f /run/reboot-required ] && printf 'warning\thealth\ta reboot is pending\n'
} > "$state/current"
sort -u -o "$state/current" "$state/current"
touch "$state/last"
new=$(comm -13 "$state/last" "$state/current")
while IFS=$'\t' read -r sev area what; do
  [ -n "$sev" ] || continue
  logger -t selfhost-check -p "daemon.$([ "$sev" = error ] && echo err || echo warning)" "$area: $what"
done < "$state/current"
if [ -n "$new" ]; then
  logger -t selfhost-check -p daemon.warning "worse since the last check: $(echo "$new" | wc -l) new finding(s)"
  if [ -n "$mail" ] && [ -x /usr/sbin/sendmail ]; then
    { printf 'To: root\nSubject: selfhost-check on %s: %s new finding(s)\n\n' "$(hostname)" "$(echo "$new" | wc -l)"
      printf 'New since the last check:\n%s\n\nAll findings:\n' "$(echo "$new" | tr '\t' ' ')"
      tr '\t' ' ' < "$state/current"
      printf '\nFrom the deploying machine, `selfhost check` shows the details and diffs.\n'
    } | /usr/sbin/sendmail -t || logger -t selfhost-check -p daemon.err "could not mail the admin"
  fi
fi
mv -f "$state/current" "$state/last"
if grep -q '^error' "$state/last"; then exit 2; fi
if [ -s "$state/last" ]; then exit 1; fi
exit 0
"""
