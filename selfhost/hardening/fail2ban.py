"""fail2ban: jails derived from the enabled services (sshd always), systemd backend, recidive."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from selfhost.hardening.base import Control
from selfhost.services.base import Contribution, Jail, ManagedFile, Unit

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.models.server import Server

JAIL_CONF = "/etc/fail2ban/jail.local"
VALIDATE = (
    "d=$(mktemp -d) && cp -a /etc/fail2ban/. \"$d\" && cp {path} \"$d/jail.local\" "
    "&& fail2ban-client -c \"$d\" -t >/dev/null; rc=$?; rm -rf \"$d\"; exit $rc"
)


class Fail2banHardening(Control):
    """Ban addresses that fail to log in repeatedly, with longer bans for repeat offenders."""

    bantime_minutes: int = Field(default=60, ge=1, description="First ban length.")
    findtime_minutes: int = Field(default=10, ge=1, description="Window for counting failures.")
    maxretry: int = Field(default=5, ge=1, description="Failures allowed within the window.")
    ignore: list[str] = Field(
        default_factory=list, description="Addresses/networks never banned (e.g. your LAN)."
    )

    def jail_local(self, jails: list[Jail]) -> str:
        out = [
            "# Managed by selfhost: jails derived from the enabled services.",
            "[DEFAULT]",
            "backend = systemd",
            "banaction = nftables-multiport",
            "banaction_allports = nftables-allports",
            f"bantime = {self.bantime_minutes}m",
            "bantime.increment = true",
            "bantime.maxtime = 1w",
            f"findtime = {self.findtime_minutes}m",
            f"maxretry = {self.maxretry}",
            "ignoreip = " + " ".join(["127.0.0.1/8", "::1", *self.ignore]),
            "",
        ]
        for jail in sorted(jails, key=lambda j: j.name):
            out += [f"[{jail.name}]", "enabled = true", f"port = {jail.port}"]
            if jail.filter:
                out.append(f"filter = {jail.filter}")
            if jail.journalmatch:
                out.append(f"journalmatch = {jail.journalmatch}")
            if jail.logpath:
                out += ["backend = auto", f"logpath = {jail.logpath}"]
            if jail.maxretry:
                out.append(f"maxretry = {jail.maxretry}")
            if jail.name == "sshd":
                out.append("mode = aggressive")
            out.append("")
        out += [
            "[recidive]",
            "enabled = true",
            "backend = auto",
            "logpath = /var/log/fail2ban.log",
            "banaction = nftables-allports",
            "bantime = 1w",
            "findtime = 1d",
            "",
        ]
        return "\n".join(out)

    def contribute_jails(self, server: Server, target: Target, jails: list[Jail]) -> Contribution:
        c = Contribution()
        if not self.enabled:
            return c
        c.packages += ["fail2ban", "python3-systemd"]
        c.files.append(ManagedFile(JAIL_CONF, self.jail_local(jails), validate=VALIDATE))
        # Restart, not reload: fail2ban 1.1 (Debian 13) drops a jail's actions when a reload
        # changes its banaction (Debian's default `nftables` -> our `nftables-multiport`), and
        # the jail then bans nobody. Bans survive a restart (fail2ban's database restores them).
        c.units.append(Unit("fail2ban.service", reload_on=(JAIL_CONF,), reload=False))
        return c
