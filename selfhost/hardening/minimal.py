"""Only what is needed: legacy and discovery services absent or masked."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from selfhost.apt import APT_GET
from selfhost.compose.module import Contribution, Env
from selfhost.compose.resources import Command
from selfhost.hardening.base import Control

if TYPE_CHECKING:
    pass

ABSENT = [
    "telnet", "telnetd", "inetutils-telnet", "inetutils-telnetd", "rsh-client", "rsh-server",
    "rsh-redone-client", "rsh-redone-server", "nis", "talk", "talkd", "tftp", "tftpd-hpa",
    "xinetd", "avahi-daemon", "rpcbind", "nfs-common", "cups-browsed", "ftp", "vsftpd",
    "snmpd", "finger",
]
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_UNIT = re.compile(r"[A-Za-z0-9:_.@-]+\.(service|socket|target|timer|path|mount|automount|swap|"
                   r"slice|scope|device)")
MASKED = ["avahi-daemon.service", "avahi-daemon.socket", "rpcbind.service", "rpcbind.socket",
          "cups-browsed.service", "ctrl-alt-del.target", "debug-shell.service"]


class MinimalHardening(Control):
    """Remove legacy remote-login and discovery software; mask what must never start."""

    absent_packages: list[str] = Field(
        default_factory=lambda: list(ABSENT),
        description="Packages that must not be installed (purged if present).",
    )
    masked_units: list[str] = Field(
        default_factory=lambda: list(MASKED),
        description="systemd units masked so that nothing can start them.",
    )

    @field_validator("absent_packages")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _PACKAGE.fullmatch(name):
                raise ValueError(f"{name!r} is not a Debian package name (a-z, 0-9, '+', '-', "
                                 "'.', starting with a letter or digit)")
        return v

    @field_validator("masked_units")
    @classmethod
    def _units(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _UNIT.fullmatch(name):
                raise ValueError(f"{name!r} is not a systemd unit name such as "
                                 "'rpcbind.service'")
        return v

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        if not self.enabled:
            return c
        pkgs = " ".join(sorted(self.absent_packages))
        installed = (f"dpkg-query -W -f='${{db:Status-Abbrev}} ${{Package}}\\n' {pkgs} "
                     "2>/dev/null | awk '$1 ~ /^[ih]i/ {print $2}'")
        c.commands.append(Command(
            "remove unneeded packages",
            f"p=$({installed}); [ -z \"$p\" ] || DEBIAN_FRONTEND=noninteractive "
            f"{APT_GET} purge -y -qq $p >/dev/null",
            unless=f'test -z "$({installed})"',
        ))
        units = sorted(self.masked_units)
        c.commands.append(Command(
            "mask units that must never start",
            "systemctl mask " + " ".join(units) + " >/dev/null 2>&1",
            unless=" && ".join(f'test "$(readlink /etc/systemd/system/{u})" = /dev/null'
                               for u in units),
        ))
        return c
