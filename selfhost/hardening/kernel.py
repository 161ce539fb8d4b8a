"""Kernel settings (sysctl) and module blacklist, covering at least dev-sec's intent.

Services that need an exception (a VPN needs IP forwarding) contribute it and the file says
which service asked. Keys a container cannot set are reported and skipped, not failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from selfhost.hardening.base import Control
from selfhost.services.base import Command, Contribution, ManagedFile

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.models.server import Server

SYSCTL_CONF = "/etc/sysctl.d/60-selfhost-hardening.conf"
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

    def settings(self, service_sysctl: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
        """(key, value, comment) sorted by key: defaults, then service needs, then overrides."""
        merged: dict[str, tuple[str, str]] = {k: (v, "") for k, v in HARDENED_SYSCTL.items()}
        for key, (value, who) in service_sysctl.items():
            merged[key] = (value, f"needed by service {who}")
        for key, value in self.sysctl_overrides.items():
            merged[key] = (value, "override from the model")
        return [(k, v, c) for k, (v, c) in sorted(merged.items())]

    def contribute_with(self, server: Server, target: Target,
                        service_sysctl: dict[str, tuple[str, str]]) -> Contribution:
        c = Contribution(packages=["procps"])
        if not self.enabled:
            return c
        lines = ["# Managed by selfhost: kernel hardening (applied at boot by systemd-sysctl)."]
        for key, value, comment in self.settings(service_sysctl):
            if comment:
                lines.append(f"# {comment}")
            lines.append(f"{key} = {value}")
        c.files.append(ManagedFile(SYSCTL_CONF, "\n".join(lines) + "\n"))
        c.commands.append(Command("apply kernel settings", APPLY, on_change=(SYSCTL_CONF,)))
        if self.blacklist_modules:
            mods = ["# Managed by selfhost: modules a home server does not need.",
                    "# vfat is not listed: the EFI system partition needs it."]
            mods += [f"install {m} /bin/false\nblacklist {m}" for m in BLACKLIST]
            c.files.append(ManagedFile(MODPROBE_CONF, "\n".join(mods) + "\n"))
        if self.apparmor and not target.in_container:
            c.packages.append("apparmor")  # its postinst enables and starts apparmor.service
        return c
