"""The base system every host gets: packages, time zone and sync, host name, the admins'
sudo rules; and the built-in providers of system users, DNS records and health checks."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, ClassVar

from selfhost.apt import APT_GET
from selfhost.compose.module import Contribution, Env, Module, Problem
from selfhost.compose.requests import DnsRecord, HealthCheck, Request, Sendmail, SystemUser
from selfhost.compose.resources import Command, ManagedFile

if TYPE_CHECKING:
    from selfhost.models.server import Server

SUDOERS = "/etc/sudoers.d/selfhost-admins"
BASE_PACKAGES = ["tzdata", "sudo", "ca-certificates", "curl"]
TIME_DAEMONS = ("systemd-timesyncd", "chrony", "ntpsec", "ntp", "openntpd")


class System(Module):
    """Base packages, time zone, time sync, host name, sudoers; provider of system users."""

    provides: ClassVar[tuple[type[Request], ...]] = (SystemUser,)

    def requests(self, env: Env) -> list[Request]:
        """The host's own name: A/AAAA for its public addresses (its LAN addresses under a
        private domain such as home.arpa, for the LAN resolver)."""
        from selfhost.services.web import is_public_domain

        server = env.server
        kind = "public" if is_public_domain(server.domain) else "lan"
        return [DnsRecord(server.fqdn, "A" if a.version == 4 else "AAAA", str(a),
                          origin=env.path.removesuffix("system") + f"addresses.{kind}.{i}")
                for i, a in enumerate(getattr(server.addresses, kind))]

    def assertions(self, env: Env) -> list[Problem]:
        """An admin's alert address must not be root's own (a loop), and must be reachable:
        without ``notify`` or a mail server on the host, nothing sends root's mail."""
        server = env.server
        out = []
        own = {f"{local}@{server.fqdn}" for local in ("root", "postmaster")}
        for i, a in enumerate(server.admins):
            if a.email is None:
                continue
            if a.email.lower() in own:
                out.append(Problem(("admins", i, "email"), f"{a.email} is where root's mail "
                                   "comes from: it would loop; give the admin's own address"))
            elif not env.has_sendmail():
                out.append(Problem(("admins", i, "email"), f"{a.email} gets no alert: the "
                                   "host sends no mail without `notify` (a relay) or the mail "
                                   "service", severity="warning"))
        return out

    def contribute(self, env: Env) -> Contribution:
        c = base_contribution(env.server)
        for u in sorted(env.incoming(SystemUser), key=lambda u: u.name):
            q = shlex.quote
            groups = "".join(f"getent group {q(g)} >/dev/null || groupadd --system {q(g)}; "
                             for g in u.groups)
            add = (f"useradd --system --user-group --home-dir {q(u.home)} --no-create-home "
                   f"--shell /usr/sbin/nologin {q(u.name)}")
            member = (f" && usermod -aG {','.join(u.groups)} {q(u.name)}" if u.groups else "")
            check = f"id -u {q(u.name)} >/dev/null 2>&1" + "".join(
                f" && id -nG {q(u.name)} | grep -qw {q(g)}" for g in u.groups)
            c.commands.append(Command(f"system user {u.name} ({u.origin})",
                                      f"{groups}{{ id -u {q(u.name)} >/dev/null 2>&1 || "
                                      f"{add}; }}{member}", unless=check))
        return c


class Records(Module):
    """Provider of DNS records, health checks and the sendmail role (one holder at most): the
    plan lists them (``selfhost plan``,
    later ``selfhost dns`` and ``selfhost check``)."""

    provides: ClassVar[tuple[type[Request], ...]] = (DnsRecord, HealthCheck, Sendmail)


def base_contribution(server: Server) -> Contribution:
    c = Contribution(packages=list(BASE_PACKAGES))
    tz = server.timezone
    c.commands.append(Command(
        f"time zone {tz}",
        f"ln -sf /usr/share/zoneinfo/{tz} /etc/localtime && echo {tz} > /etc/timezone",
        unless=f'test "$(readlink /etc/localtime)" = /usr/share/zoneinfo/{tz} && '
        f"grep -qx {tz} /etc/timezone",
    ))
    if server.time_sync:
        # A guarded command, not a package: systemd-timesyncd conflicts with the other time
        # daemons, and apt would remove the admin's chrony to install it.
        c.commands.append(Command(
            "time sync: systemd-timesyncd (NTP)",
            f"export DEBIAN_FRONTEND=noninteractive; i='{APT_GET} install -y -qq "
            "--no-install-recommends systemd-timesyncd'; "
            f"$i >/dev/null 2>&1 || {{ {APT_GET} update -qq && $i >/dev/null; }}",
            unless=f"dpkg-query -W -f='${{Status}}\\n' {' '.join(TIME_DAEMONS)} "
            "2>/dev/null | grep -q 'ok installed'",
            with_packages=("systemd-timesyncd",),
        ))
    name = server.hostname
    c.commands.append(Command(
        f"host name {name}",
        f"hostnamectl set-hostname {name} 2>/dev/null || {{ echo {name} > /etc/hostname; "
        f"hostname {name} 2>/dev/null || echo 'selfhost: the running host name cannot be "
        "changed here (a container?); /etc/hostname is set for the next boot' >&2; }",
        unless=f"grep -qx {name} /etc/hostname && "
        f'{{ test "$(hostname)" = {name} || systemd-detect-virt --container --quiet; }}',
    ))
    from selfhost.hardening.accounts import sudoers

    c.files.append(ManagedFile(SUDOERS, sudoers(server), mode="0440",
                               validate="visudo -cqf {path}"))
    return c
