"""fail2ban: the provider of :class:`~selfhost.compose.requests.Jail` requests (sshd always,
and every login a service exposes), systemd backend, recidive.

The fleet's own hosts are never banned: their addresses (public, LAN, VPN) are in
``ignoreip``, so a monitoring probe or a backup from the friend's host cannot lock it out."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import Jail, Request
from selfhost.compose.resources import ManagedFile, Unit
from selfhost.compose.route import loc_of
from selfhost.hardening.base import Control

if TYPE_CHECKING:
    pass

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

    def jail_local(self, jails: list[Jail], trusted: list[str] | None = None) -> str:
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
            "ignoreip = " + " ".join(["127.0.0.1/8", "::1", *self.ignore, *(trusted or [])]),
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
            if jail.findtime:
                out.append(f"findtime = {jail.findtime}")
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

    provides: ClassVar[tuple[type[Request], ...]] = (Jail,)

    def assertions(self, env: Env) -> list[Problem]:
        if self.enabled:
            return []
        return [Problem(loc_of(j.origin), f"{j.describe()} is not installed: hardening.fail2ban "
                        f"is off ({self.reason})", severity="warning")
                for j in env.incoming(Jail) if not j.origin.startswith("hardening.")]

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        if not self.enabled:
            return c
        jails = env.incoming(Jail)
        c.packages += ["fail2ban", "python3-systemd"]
        filters: set[str] = set()  # jails may share a filter: written once
        for jail in sorted(jails, key=lambda j: j.name):
            if jail.filter_definition and jail.filter and jail.filter not in filters:
                filters.add(jail.filter)
                c.files.append(ManagedFile(f"/etc/fail2ban/filter.d/{jail.filter}.conf",
                                           jail.filter_definition))
        trusted = trusted_addresses(env)
        c.files.append(ManagedFile(JAIL_CONF, self.jail_local(jails, trusted), validate=VALIDATE))
        # Restart, not reload: fail2ban 1.1 (Debian 13) drops a jail's actions when a reload
        # changes its banaction (Debian's default `nftables` -> our `nftables-multiport`), and
        # the jail then bans nobody. Bans survive a restart (fail2ban's database restores them).
        reload_on = (JAIL_CONF, *sorted(f"/etc/fail2ban/filter.d/{f}.conf" for f in filters))
        c.units.append(Unit("fail2ban.service", reload_on=reload_on, reload=False))
        return c


def trusted_addresses(env: Env) -> list[str]:
    """Addresses of the fleet's other hosts (and this host's own), never banned or limited."""
    # Every host of an N-host fleet calls this (twice): a dict keeps the first-seen order and
    # deduplicates in linear time (a list's `in` made a fleet's compile cubic in N), and hosts
    # without addresses cost three attribute reads.
    out: dict[str, None] = {}
    for server in env.fleet.hosts.values():
        a = server.addresses
        if a.public or a.lan or a.vpn:
            out.update(dict.fromkeys(a.all()))
    return list(out)
