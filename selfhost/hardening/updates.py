"""Automatic updates: unattended-upgrades, a reboot window, needrestart."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env
from selfhost.compose.resources import Command, ManagedFile, Unit
from selfhost.hardening.base import Control

if TYPE_CHECKING:
    pass

AUTO_UPGRADES = "/etc/apt/apt.conf.d/20auto-upgrades"
UU_CONF = "/etc/apt/apt.conf.d/52selfhost-unattended-upgrades"
NEEDRESTART_CONF = "/etc/needrestart/conf.d/50-selfhost.conf"
COUNT_SECURITY_UPDATES = ("apt-get -s -o Debug::NoLocking=1 upgrade 2>/dev/null | grep '^Inst' "
                          "| grep -ci security")
"""Shell printing how many security updates are pending (apt's simulation: 1-4 s)."""
PENDING_CACHE = "/var/lib/selfhost/pending-updates"
"""The count, written after each `apt-get update` (an APT hook) so that ``selfhost check``
reads it instead of simulating an upgrade; used while it is newer than dpkg's status and the
package lists."""
PENDING_SCRIPT = "/usr/local/lib/selfhost/pending-updates"
PENDING_HOOK = "/etc/apt/apt.conf.d/99selfhost-pending-updates"
FRESH_COUNT = (f"[ -s {PENDING_CACHE} ] && [ {PENDING_CACHE} -nt /var/lib/dpkg/status ] && "
               f"[ {PENDING_CACHE} -nt /var/lib/apt/lists ]")
"""Whether :data:`PENDING_CACHE` still counts what apt would upgrade."""


class UpdatesHardening(Control):
    """Install updates every day, unattended, and reboot in a window when a reboot is needed."""

    scope: Literal["security", "all"] = Field(
        default="security",
        description="'security': Debian security updates only; 'all': also point releases.",
    )
    automatic_reboot: bool = Field(
        default=True, description="Reboot automatically when an update requires it."
    )
    reboot_time: str = Field(default="04:00", description="When to reboot (HH:MM, local time).")
    restart_services: bool = Field(
        default=True, description="needrestart restarts services that use outdated libraries."
    )
    mail_report: Literal["always", "on-change", "only-on-error"] = Field(
        default="on-change",
        description="When unattended-upgrades mails its report to root (the admin), if a "
        "module provides sendmail (`notify`, or the mail server): 'on-change' (something was "
        "upgraded or failed), 'only-on-error', or 'always'. The report always goes to the "
        "journal.",
    )

    @field_validator("reboot_time")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not re.fullmatch(r"([01][0-9]|2[0-3]):[0-5][0-9]", v):
            raise ValueError("must be HH:MM, 24-hour clock")
        return v

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        if not self.enabled:
            return c
        c.packages += ["unattended-upgrades", "needrestart"]
        c.files.append(ManagedFile(AUTO_UPGRADES, "\n".join([
            "// Managed by selfhost.",
            'APT::Periodic::Update-Package-Lists "1";',
            'APT::Periodic::Unattended-Upgrade "1";',
            'APT::Periodic::AutocleanInterval "7";',
            "",
        ]), validate="apt-config -c {path} dump >/dev/null"))
        origins = [
            "origin=Debian,codename=${distro_codename},label=Debian-Security",
            "origin=Debian,codename=${distro_codename}-security,label=Debian-Security",
        ]
        if self.scope == "all":
            origins += [
                "origin=Debian,codename=${distro_codename},label=Debian",
                "origin=Debian,codename=${distro_codename}-updates,label=Debian",
            ]
        lines = ["// Managed by selfhost.", "Unattended-Upgrade::Origins-Pattern {"]
        lines += [f'\t"{o}";' for o in origins]
        lines += [
            "};",
            f'Unattended-Upgrade::Automatic-Reboot "{str(self.automatic_reboot).lower()}";',
            f'Unattended-Upgrade::Automatic-Reboot-Time "{self.reboot_time}";',
            'Unattended-Upgrade::Remove-Unused-Kernel-Packages "true";',
            'Unattended-Upgrade::Remove-Unused-Dependencies "true";',
            'Unattended-Upgrade::SyslogEnable "true";',
            'Unattended-Upgrade::SyslogFacility "daemon";',
        ]
        # The report: always in the journal (syslog above); by mail too when a module provides
        # sendmail (root is aliased to the admin's address).
        if env.has_sendmail():
            lines += ['Unattended-Upgrade::Mail "root";',
                      f'Unattended-Upgrade::MailReport "{self.mail_report}";']
        lines.append("")
        c.files.append(ManagedFile(UU_CONF, "\n".join(lines),
                                   validate="apt-config -c {path} dump >/dev/null"))
        mode = "a" if self.restart_services else "l"
        c.files.append(ManagedFile(NEEDRESTART_CONF,
                                   f"# Managed by selfhost.\n$nrconf{{restart}} = '{mode}';\n",
                                   validate="perl -c {path} 2>/dev/null"))
        c.files.append(ManagedFile(PENDING_SCRIPT, "\n".join([
            "#!/bin/sh",
            "# Managed by selfhost: count the pending security updates into",
            f"# {PENDING_CACHE} (run by APT after each package list update).",
            "set -u",
            f"n=$({COUNT_SECURITY_UPDATES})",
            f'printf "%s\\n" "${{n:-0}}" > {PENDING_CACHE}.new && mv -f {PENDING_CACHE}.new '
            f"{PENDING_CACHE}", ""]), mode="0755"))
        c.files.append(ManagedFile(PENDING_HOOK, "\n".join([
            "// Managed by selfhost: keep the count of pending security updates current for",
            "// selfhost check (it would otherwise simulate an upgrade, seconds each time).",
            f'APT::Update::Post-Invoke-Success {{ "[ ! -x {PENDING_SCRIPT} ] || '
            f'{PENDING_SCRIPT} || true"; }};', ""]),
            validate="apt-config -c {path} dump >/dev/null"))
        c.commands.append(Command("updates: count the pending security updates",
                                  PENDING_SCRIPT, on_change=(PENDING_SCRIPT, PENDING_HOOK)))
        c.units.append(Unit("apt-daily.timer", reload=False))
        c.units.append(Unit("apt-daily-upgrade.timer", reload=False))
        return c
