"""Audit and accountability: know what happened on the server, and notice tampering.

Kernel audit rules (auditd), process accounting, sysstat, package and file integrity checks
(debsums, AIDE), a rootkit scanner (rkhunter), per-user temporary directories, legal banners,
an idle-shell timeout, cron for root only and compilers for root only. Everything comes from
Debian's own packages and runs from Debian's own cron jobs and timers.

None of it touches SSH, sudo or PAM authentication: the only PAM change is pam_tmpdir in the
session stack, which sets ``$TMPDIR``.

In a container (LXC, podman...) the kernel's audit and accounting interfaces belong to the host:
auditd and acct are installed but skipped there by a ``ConditionVirtualization=!container``
drop-in, and AIDE (which Debian runs with capabilities a container lacks) is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from selfhost.compose.module import Contribution, Env
from selfhost.compose.resources import Command, ManagedFile, Unit
from selfhost.hardening.base import Control

if TYPE_CHECKING:
    pass

AUDIT_RULES = "/etc/audit/rules.d/50-selfhost.rules"
AUDITD_DROPIN = "/etc/systemd/system/auditd.service.d/selfhost-container.conf"
# Debian 13 loads the rules from a separate unit, which fails in a container as auditd does.
AUDIT_RULES_DROPIN = "/etc/systemd/system/audit-rules.service.d/selfhost-container.conf"
ACCT_DROPIN = "/etc/systemd/system/acct.service.d/selfhost-container.conf"
ISSUE = "/etc/issue"
ISSUE_NET = "/etc/issue.net"
TMOUT_PROFILE = "/etc/profile.d/50-selfhost-tmout.sh"
CRON_ALLOW = "/etc/cron.allow"

DEFAULT_BANNER = (
    "Authorised access only. This is a private system: activity on it is monitored and\n"
    "logged, and unauthorised access is prohibited and may be reported to law enforcement.\n"
)

# Watches and syscalls worth a record on a home server: who changed accounts, privileges,
# authentication, sshd, the firewall, kernel settings, scheduled jobs, modules and the clock.
AUDIT_RULE_LINES = [
    "# Managed by selfhost: audit rules (loaded by augenrules; search with ausearch -k KEY).",
    "-w /etc/passwd -p wa -k identity",
    "-w /etc/group -p wa -k identity",
    "-w /etc/shadow -p wa -k identity",
    "-w /etc/gshadow -p wa -k identity",
    "-w /etc/security/opasswd -p wa -k identity",
    "-w /etc/sudoers -p wa -k privilege",
    "-w /etc/sudoers.d/ -p wa -k privilege",
    "-w /etc/pam.d/ -p wa -k pam",
    "-w /etc/security/ -p wa -k pam",
    "-w /etc/login.defs -p wa -k login",
    "-w /var/log/lastlog -p wa -k logins",
    "-w /var/log/faillog -p wa -k logins",
    "-w /var/run/faillock/ -p wa -k logins",
    "-w /etc/ssh/sshd_config -p wa -k sshd",
    "-w /etc/ssh/sshd_config.d/ -p wa -k sshd",
    "-w /etc/nftables.conf -p wa -k firewall",
    "-w /etc/hosts -p wa -k network",
    "-w /etc/hostname -p wa -k network",
    "-w /etc/sysctl.conf -p wa -k sysctl",
    "-w /etc/sysctl.d/ -p wa -k sysctl",
    "-w /etc/modprobe.d/ -p wa -k modules",
    "-w /etc/systemd/ -p wa -k systemd",
    "-w /etc/crontab -p wa -k cron",
    "-w /etc/cron.allow -p wa -k cron",
    "-w /etc/cron.d/ -p wa -k cron",
    "-w /var/spool/cron/ -p wa -k cron",
    "-w /etc/audit/ -p wa -k audit-config",
    "-w /usr/bin/sudo -p x -k privileged",
    "-w /usr/bin/su -p x -k privileged",
    "-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k modules",
    "-a always,exit -F arch=b64 -S adjtimex,settimeofday,clock_settime -k time-change",
    "-a always,exit -F arch=b64 -S mount,umount2 -F auid>=1000 -F auid!=unset -k mounts",
    "-a always,exit -F arch=b64 -S execve -C uid!=euid -F euid=0 -k setuid-exec",
]

CONTAINER_DROPIN = (
    "# Managed by selfhost: this kernel interface is not namespaced; in a container it\n"
    "# belongs to the host, so the unit is skipped there instead of failing.\n"
    "[Unit]\nConditionVirtualization=!container\n"
)

COMPILERS = "as cc c++ gcc g++ clang clang++"
# Resolve each compiler on PATH to its real file; each must have a dpkg-statoverride, which
# survives package upgrades (a plain chmod would be undone by the next upgrade).
_COMPILER_LOOP = (
    f"for b in {COMPILERS}; do p=$(command -v \"$b\") || continue; r=$(readlink -f \"$p\"); "
)


def _restrict_compilers(packages: list[str]) -> Command:
    """The guard runs before this deploy installs anything, and packages installed now may
    bring an assembler (needrestart pulls binutils): while ``packages`` are missing, run."""
    installed = ""
    if packages:
        installed = (f"! dpkg-query -W -f='${{db:Status-Abbrev}}\\n' {' '.join(packages)} "
                     "2>&1 | grep -qv '^ii' && ")
    return Command(
        "compilers: root only (dpkg-statoverride 0750)",
        _COMPILER_LOOP + "dpkg-statoverride --list \"$r\" >/dev/null || "
        "dpkg-statoverride --update --add root root 0750 \"$r\"; done",
        unless=installed + "{ " + _COMPILER_LOOP
        + "dpkg-statoverride --list \"$r\" >/dev/null || exit 1; done; }",
        after_files=True,
    )


def _debconf_and_default(package: str, path: str, settings: dict[str, tuple[str, str]],
                         label: str) -> Command:
    """Set KEY="value" lines in a /etc/default file, and the matching debconf answers, so that
    a package upgrade (whose postinst rewrites the file from debconf) keeps them."""
    cmds, guards = [], []
    for key, (value, question) in settings.items():
        if question:
            cmds.append(f"echo '{package} {question} boolean {value}' | debconf-set-selections")
        cmds.append(f"sed -i -E 's/^{key}=.*/{key}=\"{value}\"/' {path}")
        cmds.append(f"(grep -qE '^{key}=' {path} || echo '{key}=\"{value}\"' >> {path})")
        guards.append(f"grep -qxE '{key}=\"?{value}\"?' {path}")
    return Command(label, " && ".join(cmds), unless=" && ".join(guards))


class AuditHardening(Control):
    """Auditing, accounting and integrity checking, with the small hardening around them."""

    multiline_fields = frozenset({"banner"})

    auditd: bool = Field(
        default=True,
        description="Run auditd with rules recording changes to accounts, sudo, PAM, sshd, "
        "firewall, kernel settings, cron, modules and the clock, and privileged commands.",
    )
    process_accounting: bool = Field(
        default=True,
        description="Record every process run (acct; see `lastcomm`, `sa`).",
    )
    sysstat: bool = Field(
        default=True,
        description="Collect performance history every 10 minutes (sysstat; see `sar`).",
    )
    package_integrity: bool = Field(
        default=True,
        description="Install debsums and check installed files against the packages' "
        "checksums weekly; install apt-show-versions to list pending upgrades.",
    )
    file_integrity: bool = Field(
        default=True,
        description="AIDE file integrity database, built on the first deploy and checked "
        "daily (not in containers: Debian runs AIDE with capabilities they lack). After "
        "intended changes, refresh the baseline with `aideinit -y -f`.",
    )
    rootkit_scanner: bool = Field(
        default=True,
        description="rkhunter: baseline on the first deploy, daily scan, baseline refreshed "
        "after every apt run.",
    )
    private_tmp: bool = Field(
        default=True,
        description="Per-user temporary directories for login sessions (libpam-tmpdir).",
    )
    apt_listchanges: bool = Field(
        default=True,
        description="Show packages' NEWS (important changes) before upgrades "
        "(apt-listchanges).",
    )
    banner: str | None = Field(
        default=DEFAULT_BANNER,
        min_length=1,
        description="Legal notice written to /etc/issue and /etc/issue.net; null keeps "
        "Debian's files.",
    )
    shell_idle_timeout_minutes: int = Field(
        default=15, ge=0, le=1440,
        description="Log out interactive shells idle for this long (TMOUT, read-only); "
        "0 turns it off.",
    )
    cron_root_only: bool = Field(
        default=True,
        description="Install cron (it runs the daily checks above) and allow only root to "
        "have a crontab (/etc/cron.allow).",
    )
    restrict_compilers: bool = Field(
        default=True,
        description="Make installed compilers and assemblers executable by root only "
        "(dpkg-statoverride, kept across upgrades).",
    )

    def contribute(self, env: Env) -> Contribution:
        target = env.require_target()
        c = Contribution()
        if not self.enabled:
            return c
        container = target.in_container
        if self.auditd:
            c.packages.append("auditd")
            c.files.append(ManagedFile(AUDIT_RULES, "\n".join(AUDIT_RULE_LINES) + "\n",
                                       mode="0640"))
            c.files.append(ManagedFile(AUDITD_DROPIN, CONTAINER_DROPIN))
            c.files.append(ManagedFile(AUDIT_RULES_DROPIN, CONTAINER_DROPIN))
            c.units.append(Unit("auditd.service", running=not container))
            if not container:
                c.commands.append(Command("load audit rules", "augenrules --load >/dev/null",
                                          on_change=(AUDIT_RULES,)))
        if self.process_accounting:
            c.packages.append("acct")
            c.files.append(ManagedFile(ACCT_DROPIN, CONTAINER_DROPIN))
            c.units.append(Unit("acct.service", running=not container))
        dropins = tuple(p for p, on in ((AUDITD_DROPIN, self.auditd),
                                        (AUDIT_RULES_DROPIN, self.auditd),
                                        (ACCT_DROPIN, self.process_accounting)) if on)
        if dropins:
            units = " ".join(u for u, on in (("auditd.service audit-rules.service", self.auditd),
                                             ("acct.service", self.process_accounting)) if on)
            c.commands.append(Command(
                "systemd: reload units (audit drop-ins)",
                f"systemctl daemon-reload && (systemctl reset-failed {units} 2>/dev/null; true)",
                on_change=dropins,
            ))
        if self.sysstat:
            c.packages.append("sysstat")
            c.commands.append(_debconf_and_default(
                "sysstat", "/etc/default/sysstat", {"ENABLED": ("true", "sysstat/enable")},
                "sysstat: collect every 10 minutes"))
            c.units.append(Unit("sysstat.service"))
        if self.package_integrity:
            c.packages += ["debsums", "apt-show-versions"]
            c.commands.append(_debconf_and_default(
                "debsums", "/etc/default/debsums", {"CRON_CHECK": ("weekly", "")},
                "debsums: weekly check of installed files"))
        if self.file_integrity and not container:
            c.packages += ["aide", "aide-common"]
            c.commands.append(Command(
                "AIDE: build the file integrity baseline",
                "aideinit -y -f >/dev/null",
                unless="test -s /var/lib/aide/aide.db",
                after_files=True,
            ))
        if self.rootkit_scanner:
            c.packages.append("rkhunter")
            c.commands.append(_debconf_and_default(
                "rkhunter", "/etc/default/rkhunter",
                {"CRON_DAILY_RUN": ("true", "rkhunter/cron_daily_run"),
                 "APT_AUTOGEN": ("true", "rkhunter/apt_autogen")},
                "rkhunter: daily scan, baseline refreshed after apt"))
            c.commands.append(Command(
                "rkhunter: record the file properties baseline",
                "rkhunter --propupd --nocolors >/dev/null",
                unless="test -s /var/lib/rkhunter/db/rkhunter.dat",
                after_files=True,
            ))
        if self.private_tmp:
            c.packages.append("libpam-tmpdir")
            c.commands.append(Command(
                "PAM: per-user temporary directories",
                "DEBIAN_FRONTEND=noninteractive pam-auth-update --package --enable tmpdir",
                unless="grep -q pam_tmpdir.so /etc/pam.d/common-session",
            ))
        if self.apt_listchanges:
            c.packages.append("apt-listchanges")
        if self.banner is not None:
            text = self.banner if self.banner.endswith("\n") else self.banner + "\n"
            c.files.append(ManagedFile(ISSUE, text))
            c.files.append(ManagedFile(ISSUE_NET, text))
        if self.shell_idle_timeout_minutes:
            seconds = self.shell_idle_timeout_minutes * 60
            c.files.append(ManagedFile(TMOUT_PROFILE, "\n".join([
                "# Managed by selfhost: log out interactive shells idle for "
                f"{self.shell_idle_timeout_minutes} minutes.",
                f'if [ "${{TMOUT:-}}" != {seconds} ]; then',
                f"    TMOUT={seconds}",
                "    readonly TMOUT",
                "    export TMOUT",
                "fi",
                "",
            ])))
        if self.cron_root_only:
            c.packages.append("cron")
            # 0640 root:root as CIS asks: root reads it; anyone else is denied either way.
            c.files.append(ManagedFile(CRON_ALLOW, "root\n", mode="0640"))
            c.units.append(Unit("cron.service"))
        if self.restrict_compilers:
            c.commands.append(_restrict_compilers(sorted(set(c.packages))))
        return c
