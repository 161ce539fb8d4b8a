"""Monitoring: Monit (Debian's package) watches the host every minute and mails the admin
when something goes wrong, and again when it is back.

Why Monit: a home server needs to notice trouble, not to keep graphs. Monit is one small
daemon from Debian with its own check cycle, state across restarts and "tell me once when it
changes" built in; Prometheus + node-exporter + Alertmanager (three daemons and a TSDB) or
Netdata (a web dashboard to expose and secure) cost more than what they add here. selfhost's
daily ``selfhost-check`` stays the deep check (drift, updates); Monit is the quick one.

What it watches, all derived from the model, nothing listed by hand:

- the disks (space and inodes of ``/`` and of the model's extra paths) and memory;
- failed systemd units (the whole system, not only selfhost's);
- every health check the other modules request (a unit active, a TCP port answering, an
  HTTPS name answering, a certificate valid for ``certificate_days`` more days);
- outbound traffic: bytes sent on the default-route interface per cycle, against
  ``outbound_mb_per_minute`` (an association's warning sign of a hacked form sending spam).

Alerts: Monit runs ``/usr/local/sbin/selfhost-monitor-alert`` on each change of state (failed,
then recovered: never the same news every cycle). It logs to the journal and, when a module
provides the sendmail role (the notify relay, or the mail server), mails root, whom the
sendmail role delivers to the admin. Monit's own web interface stays off.
"""

from __future__ import annotations

import re
import shlex
from typing import ClassVar

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env
from selfhost.compose.requests import MAILQUEUE_OLD, HealthCheck, Request
from selfhost.compose.resources import ManagedFile, Unit
from selfhost.services.base import Service

CONF = "/etc/monit/conf.d/selfhost"
ALERT = "/usr/local/sbin/selfhost-monitor-alert"
TRAFFIC = "/usr/local/sbin/selfhost-monitor-outbound"
PROBE = "/usr/local/sbin/selfhost-monitor-probe"

ALERT_SCRIPT = """#!/bin/sh
# Managed by selfhost: changes here are overwritten on the next deploy.
# Run by Monit on each change of a check's state (MONIT_* in the environment).
service=${MONIT_SERVICE:-?}
event=${MONIT_EVENT:-?}
text="$service: $event: ${MONIT_DESCRIPTION:-}"
logger -t selfhost-monitor -p daemon.warning -- "$text"
if [ {mail} = 1 ] && [ -x /usr/sbin/sendmail ]; then
  printf 'To: root\\nSubject: [%s] monitor: %s: %s\\n\\n%s\\n\\n%s\\n' "$(hostname)" \\
    "$service" "$event" "${MONIT_DATE:-$(date -R)}" "$text" | /usr/sbin/sendmail -oi -t
fi
"""

TRAFFIC_SCRIPT = """#!/bin/sh
# Managed by selfhost: changes here are overwritten on the next deploy.
# Outbound bytes on the default-route interface since the previous run, in MB per minute;
# exit 1 above the limit ($1, MB per minute). Run by Monit every cycle.
limit=$1
state=${SELFHOST_MONITOR_STATE:-/run/selfhost-monitor-outbound}
dev=$(ip -o route show default 2>/dev/null |
  awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
[ -n "$dev" ] || { echo "no default route"; exit 0; }
now=$(date +%s)
bytes=$(cat "/sys/class/net/$dev/statistics/tx_bytes" 2>/dev/null || echo 0)
read -r then_s then_b 2>/dev/null < "$state" || { then_s=$now; then_b=$bytes; }
echo "$now $bytes" > "$state"
elapsed=$((now - then_s))
[ "$elapsed" -gt 0 ] && [ "$bytes" -ge "$then_b" ] || { echo "first sample on $dev"; exit 0; }
rate=$(( (bytes - then_b) * 60 / elapsed / 1000000 ))
echo "$rate MB/min sent on $dev (limit $limit)"
[ "$rate" -le "$limit" ]
"""

_NAME = re.compile(r"[^a-zA-Z0-9_.-]+")


def check_name(kind: str, target: str) -> str:
    """A Monit check name (letters, digits, ``_.-``) for a health check."""
    target = target.removeprefix("https://").rstrip("/")
    return _NAME.sub("-", f"{kind}-{target}").strip("-")[:60]


class MonitoringService(Service):
    """Monit watching disks, memory, failed units, every service's health checks and outbound
    traffic, alerting the admin by mail (through the sendmail role) on each change."""

    kind: ClassVar[str] = "monitoring"
    uses: ClassVar[tuple[type[Request], ...]] = (HealthCheck,)

    interval_s: int = Field(default=60, ge=10, le=3600,
                            description="Seconds between two checks (Monit's cycle).")
    disk_percent: int = Field(default=85, ge=50, le=99, description="Alert when a file "
                              "system is fuller than this (space or inodes), in percent.")
    paths: list[str] = Field(default_factory=list, description="Mount points to watch besides "
                             "`/` (a data disk, e.g. '/srv').")
    memory_percent: int = Field(default=90, ge=50, le=99, description="Alert when memory use "
                                "stays above this for 3 cycles, in percent.")
    certificate_days: int = Field(default=14, ge=1, le=60, description="Alert when a "
                                  "certificate the services use expires within this many days.")
    outbound_mb_per_minute: int | None = Field(
        default=50, ge=1, description="Alert when more than this many MB per minute leave by "
        "the default route for 2 cycles (a hacked form sending spam, a stolen backup); null: "
        "not watched.")

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"/[A-Za-z0-9_./-]*", p) or "/../" in p + "/":
                raise ValueError(f"{p!r}: an absolute path of letters, digits and _ . - /")
        return v

    def requests(self, env: Env) -> list[Request]:
        return [HealthCheck("unit", "monit.service")]

    def probes(self, checks: list[HealthCheck]) -> dict[str, str]:
        """Monit check name -> shell commands of each probe (exit 0 when healthy), run by the
        generated probe script: Monit's configuration only names them."""
        q = shlex.quote
        out = {"failed-units": "f=$(systemctl --failed --no-legend --plain | awk '{print $1}' "
                               "| tr '\\n' ' '); [ -z \"$f\" ] || { echo \"failed: $f\"; "
                               "exit 1; }"}
        for h in sorted(checks, key=lambda h: (h.kind, h.target)):
            name = check_name(h.kind, h.target)
            if h.kind == "unit":
                cmd = f"systemctl is-active --quiet {q(h.target)}"
            elif h.kind == "tcp":
                addr, _, port = h.target.rpartition(":")
                cmd = f"timeout 5 bash -c {q(f'</dev/tcp/{addr}/{port}')}"
            elif h.kind == "https":
                # Any answer but a server error: 401 is a healthy service behind a login.
                host = h.target.split("/")[2]
                cmd = (f"code=$(curl -sk -o /dev/null -w '%{{http_code}}' --max-time 10 "
                       f"--resolve {q(host + ':443:127.0.0.1')} {q(h.target)}); "
                       "echo \"HTTP $code\"; [ \"$code\" -ge 100 ] && [ \"$code\" -lt 500 ]")
            elif h.kind == "certificate":
                # The module's own threshold when shorter than a day (a private CA's
                # certificates live hours), this model's otherwise.
                left = self.certificate_days * 86400
                if h.expect.isdigit() and int(h.expect) < 86400:
                    left = int(h.expect)
                cmd = (f"echo | timeout 10 openssl s_client -connect 127.0.0.1:443 "
                       f"-servername {q(h.target)} 2>/dev/null | openssl x509 -noout "
                       f"-checkend {left}")
            elif h.kind == "backup" and h.expect.isdigit():
                # The last successful backup of a repository (the backup glue's time stamp);
                # none yet: the backup's own late-check timer says so.
                stamp = f"/var/lib/selfhost-backup/{h.target}.last-success"
                cmd = (f"[ ! -s {q(stamp)} ] || {{ age=$(( ($(date +%s) - $(cat {q(stamp)})) "
                       f"/ 3600 )); echo \"last success $age hours ago (limit {h.expect} h)\"; "
                       f"[ \"$age\" -lt {int(h.expect)} ]; }}")
            elif h.kind == "mailqueue" and h.expect.isdigit():
                cmd = (f"n=$({MAILQUEUE_OLD}); echo \"$n message(s) waiting for more than an "
                       f"hour (limit {h.expect})\"; [ \"$n\" -le {int(h.expect)} ]")
            else:
                continue
            out[name] = cmd
        return out

    def probe_script(self, probes: dict[str, str]) -> str:
        cases = "".join(f"  {shlex.quote(name)})\n    {cmd} ;;\n"
                        for name, cmd in probes.items())
        return ("#!/bin/sh\n# Managed by selfhost: changes here are overwritten on the next "
                "deploy.\n# One health probe per Monit check (exit status 0: healthy).\n"
                f'case "$1" in\n{cases}  *) echo "unknown probe $1"; exit 2 ;;\nesac\n')

    def config(self, probes: dict[str, str]) -> str:
        run = f'exec "{ALERT}"'
        both = f"then {run} else if succeeded then {run}"
        lines = ["# Managed by selfhost: changes here are overwritten on the next deploy.",
                 f"set daemon {self.interval_s}",
                 "",
                 "check system $HOST",
                 f"  if memory usage > {self.memory_percent}% for 3 cycles {both}",
                 ""]
        for i, path in enumerate(["/", *self.paths]):
            lines += [f"check filesystem fs-{i} with path {path}",
                      f"  if space usage > {self.disk_percent}% {both}",
                      f"  if inode usage > {self.disk_percent}% {both}", ""]
        if self.outbound_mb_per_minute is not None:
            lines += [f'check program outbound with path "{TRAFFIC} '
                      f'{self.outbound_mb_per_minute}"',
                      f"  if status != 0 for 2 cycles {both}", ""]
        for name in probes:
            cycles = "" if name == "failed-units" else " for 2 cycles"
            lines += [f'check program {name} with path "{PROBE} {name}"',
                      f"  if status != 0{cycles} {both}", ""]
        return "\n".join(lines)

    def contribute(self, env: Env) -> Contribution:
        checks = [h for h in env.incoming(HealthCheck) if h.target != "monit.service"]
        probes = self.probes(checks)
        c = Contribution(packages=["monit", "curl", "openssl", "iproute2"])
        mail = int(env.has_sendmail())
        c.files.append(ManagedFile(ALERT, ALERT_SCRIPT.replace("{mail}", str(mail)),
                                   mode="0755", validate="sh -n {path}"))
        c.files.append(ManagedFile(TRAFFIC, TRAFFIC_SCRIPT, mode="0755", validate="sh -n {path}"))
        c.files.append(ManagedFile(PROBE, self.probe_script(probes), mode="0755",
                                   validate="sh -n {path}"))
        # Monit reads only control files that are not readable by others (0600).
        c.files.append(ManagedFile(
            CONF, self.config(probes), mode="0600",
            validate="t=$(mktemp) && printf 'include %s\\n' {path} > \"$t\" && "
            "monit -t -c \"$t\"; rc=$?; rm -f \"$t\"; exit $rc"))
        c.units.append(Unit("monit.service", reload_on=(CONF, PROBE, ALERT, TRAFFIC)))
        return c
