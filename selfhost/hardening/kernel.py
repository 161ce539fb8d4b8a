"""Kernel settings (sysctl) and module blacklist, covering at least dev-sec's intent.

The provider of :class:`~selfhost.compose.requests.Sysctl` requests. Its own hardened values
are requests at priority 1000 (a default), services ask at 100 (a VPN needs IP forwarding),
the model's ``sysctl_overrides`` at 50; each line of the file names who asked. Switched off,
the control still writes what other modules request (and only that). Keys a container cannot
set are reported and skipped, not failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from selfhost.compose.module import Contribution, Env
from selfhost.compose.requests import Request, Sysctl
from selfhost.compose.resources import Command, ManagedFile
from selfhost.hardening.base import Control

if TYPE_CHECKING:
    pass

DEFAULT_PRIORITY = 1000
OVERRIDE_PRIORITY = 50
SYSCTL_CONF = "/etc/sysctl.d/99-zz-selfhost-hardening.conf"
"""systemd-sysctl applies the files of /etc, /run and /usr/lib's sysctl.d in the order of
their names, whatever the directory, and the last assignment of a key wins at boot. The name
sorts after every file Debian ships (Debian 12's systemd has ``99-protect-links.conf``, which
set fs.protected_fifos back to 1 when this file was ``60-...``) and after ``99-sysctl.conf``
(/etc/sysctl.conf): the model wins. ``selfhost check`` reports a file that overrides it."""
OLD_SYSCTL_CONF = "/etc/sysctl.d/60-selfhost-hardening.conf"
"""Where earlier versions wrote the settings; removed by the deploy."""
MODPROBE_CONF = "/etc/modprobe.d/selfhost-blacklist.conf"

HARDENED_SYSCTL: dict[str, str] = {
    # Network: no routing, no redirects, no source routing, reverse-path filter, syncookies.
    "net.ipv4.ip_forward": "0",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "1",
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv4.conf.default.accept_redirects": "0",
    "net.ipv4.conf.all.secure_redirects": "0",
    "net.ipv4.conf.default.secure_redirects": "0",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv6.conf.default.accept_redirects": "0",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv4.conf.default.accept_source_route": "0",
    "net.ipv6.conf.all.accept_source_route": "0",
    "net.ipv6.conf.default.accept_source_route": "0",
    "net.ipv4.conf.all.log_martians": "1",
    "net.ipv4.conf.default.log_martians": "1",
    "net.ipv4.icmp_echo_ignore_broadcasts": "1",
    "net.ipv4.icmp_ignore_bogus_error_responses": "1",
    "net.ipv4.tcp_syncookies": "1",
    "net.ipv4.tcp_rfc1337": "1",
    "net.ipv4.tcp_timestamps": "0",
    # IPv6 router advertisements and SLAAC stay on: home networks hand out IPv6 that way, and
    # turning them off (as some baselines do) silently removes the IPv6 default route.
    # Kernel: hide pointers and logs, restrict ptrace, BPF, perf, kexec, magic SysRq.
    "kernel.kptr_restrict": "2",
    "kernel.dmesg_restrict": "1",
    "kernel.yama.ptrace_scope": "1",
    "kernel.kexec_load_disabled": "1",
    "kernel.unprivileged_bpf_disabled": "1",
    "net.core.bpf_jit_harden": "2",
    "kernel.perf_event_paranoid": "3",
    "kernel.sysrq": "0",
    "kernel.ctrl-alt-del": "0",
    "kernel.randomize_va_space": "2",
    "kernel.core_uses_pid": "1",
    "dev.tty.ldisc_autoload": "0",
    # Filesystems: protected links, FIFOs and regular files; no setuid core dumps.
    "fs.protected_hardlinks": "1",
    "fs.protected_symlinks": "1",
    "fs.protected_fifos": "2",
    "fs.protected_regular": "2",
    "fs.suid_dumpable": "0",
}

# Filesystems and protocols a home server does not use. vfat is deliberately absent: the
# EFI system partition needs it, and blacklisting it breaks UEFI boots.
BLACKLIST = [
    "cramfs", "freevxfs", "hfs", "hfsplus", "jffs2", "udf", "squashfs_disabled_placeholder",
    "dccp", "sctp", "rds", "tipc", "n-hdlc", "ax25", "netrom", "x25", "rose", "decnet",
    "econet", "af_802154", "ipx", "appletalk", "psnap", "p8023", "p8022", "can", "atm",
    "firewire-core", "thunderbolt", "usb-storage_disabled_placeholder",
]
BLACKLIST = [m for m in BLACKLIST if not m.endswith("_disabled_placeholder")]

APPLY = (
    "skipped=''; "
    "for kv in $(grep -E '^[a-z]' " + SYSCTL_CONF + " | tr -d ' '); do "
    "sysctl -q -w \"$kv\" >/dev/null 2>&1 || skipped=\"$skipped ${kv%%=*}\"; done; "
    "[ -z \"$skipped\" ] || echo \"selfhost: kernel settings not settable here (skipped):$skipped\""
)


class KernelHardening(Control):
    """sysctl hardening and a blacklist of unused kernel modules."""

    sysctl_overrides: dict[str, str] = Field(
        default_factory=dict,
        description="Kernel settings to change from selfhost's defaults (key to value).",
    )
    blacklist_modules: bool = Field(
        default=True,
        description="Blacklist unused filesystem/network modules (never vfat, which UEFI needs).",
    )
    apparmor: bool = Field(
        default=True,
        description="Install AppArmor's tools and profiles, as a standard Debian install does: "
        "Debian's kernels enable the AppArmor security module, and the profiles shipped by "
        "packages confine those programs. Not installed in a container, where the host's "
        "kernel decides.",
    )

    provides: ClassVar[tuple[type[Request], ...]] = (Sysctl,)

    def requests(self, env: Env) -> list[Request]:
        if not self.enabled:
            return []
        out: list[Request] = [Sysctl(k, v, DEFAULT_PRIORITY) for k, v in HARDENED_SYSCTL.items()]
        out += [Sysctl(k, v, OVERRIDE_PRIORITY, origin=f"{env.path}.sysctl_overrides.{k}")
                for k, v in self.sysctl_overrides.items()]
        return out

    def contribute(self, env: Env) -> Contribution:
        target = env.require_target()
        c = Contribution(packages=["procps"])
        settings = sorted(env.incoming(Sysctl), key=lambda r: r.name)
        if settings:
            head = ("kernel hardening" if self.enabled else
                    f"kernel settings other modules need (hardening.kernel is off: {self.reason})")
            lines = [f"# Managed by selfhost: {head} (applied at boot by systemd-sysctl)."]
            for r in settings:
                if r.priority != DEFAULT_PRIORITY or r.origin != env.path:
                    lines.append(f"# requested by {r.origin}")
                lines.append(f"{r.name} = {r.value}")
            c.files.append(ManagedFile(SYSCTL_CONF, "\n".join(lines) + "\n"))
            c.commands.append(Command("remove the kernel settings file of earlier versions",
                                      f"rm -f {OLD_SYSCTL_CONF}",
                                      unless=f"[ ! -e {OLD_SYSCTL_CONF} ]"))
            c.commands.append(Command("apply kernel settings", APPLY, on_change=(SYSCTL_CONF,)))
        if not self.enabled:
            return c
        if self.blacklist_modules:
            mods = ["# Managed by selfhost: modules a home server does not need.",
                    "# vfat is not listed: the EFI system partition needs it."]
            mods += [f"install {m} /bin/false\nblacklist {m}" for m in BLACKLIST]
            c.files.append(ManagedFile(MODPROBE_CONF, "\n".join(mods) + "\n"))
        if self.apparmor and not target.in_container:
            c.packages.append("apparmor")  # its postinst enables and starts apparmor.service
        return c
