"""Hardening controls: each one on by default, each one switchable off with a reason."""

from __future__ import annotations

from pydantic import Field

from selfhost.hardening.accounts import AccountsHardening
from selfhost.hardening.audit import AuditHardening
from selfhost.hardening.base import Control
from selfhost.hardening.fail2ban import Fail2banHardening
from selfhost.hardening.firewall import FirewallHardening
from selfhost.hardening.kernel import KernelHardening
from selfhost.hardening.minimal import MinimalHardening
from selfhost.hardening.ssh import SshHardening
from selfhost.hardening.updates import UpdatesHardening
from selfhost.models.base import StrictModel

__all__ = ["Control", "Hardening"]


class Hardening(StrictModel):
    """How the server is hardened. The defaults are safe; change them only knowingly."""

    ssh: SshHardening = Field(default_factory=SshHardening, description="OpenSSH server.")
    firewall: FirewallHardening = Field(
        default_factory=FirewallHardening, description="nftables input firewall."
    )
    fail2ban: Fail2banHardening = Field(
        default_factory=Fail2banHardening, description="Ban repeated login failures."
    )
    updates: UpdatesHardening = Field(
        default_factory=UpdatesHardening, description="Unattended security updates."
    )
    kernel: KernelHardening = Field(
        default_factory=KernelHardening,
        description="sysctl, module blacklist, AppArmor on real kernels.",
    )
    accounts: AccountsHardening = Field(
        default_factory=AccountsHardening,
        description="login.defs, password quality, faillock, su, core dumps.",
    )
    minimal: MinimalHardening = Field(
        default_factory=MinimalHardening,
        description="Legacy/discovery software absent, dangerous units masked.",
    )
    audit: AuditHardening = Field(
        default_factory=AuditHardening,
        description="auditd, process accounting, integrity checks, rootkit scanner, banners.",
    )

    def disabled(self) -> list[tuple[str, str]]:
        """(control, reason) for every control that is turned off, then (control.setting,
        reason) for every setting of an enabled control that is off (a documented departure
        from a compliance benchmark, such as ``accounts.sudo.requiretty``)."""
        out = []
        for name in type(self).model_fields:
            ctl = getattr(self, name)
            if isinstance(ctl, Control) and not ctl.enabled:
                out.append((name, ctl.reason or ""))
        for name in type(self).model_fields:
            ctl = getattr(self, name)
            if isinstance(ctl, Control) and ctl.enabled:
                out += [(f"{name}.{path}", why) for path, why in ctl.departures()]
        return out
