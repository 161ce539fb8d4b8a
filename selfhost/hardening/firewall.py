"""nftables firewall: default drop, ports derived from SSH and the enabled services.

Only selfhost's own table (``inet selfhost``) is replaced, so rules that other software
(podman, libvirt, a VPN) adds in its own tables are left alone. Every ruleset is checked
with ``nft -c`` before it is loaded; the SSH port in use is always open.
"""

from __future__ import annotations

from collections import defaultdict
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from selfhost.hardening.base import Control
from selfhost.models.base import Port, StrictModel
from selfhost.services.base import Contribution, ManagedFile, OpenPort, Unit

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.models.server import Server

NFTABLES_CONF = "/etc/nftables.conf"

DEFAULT_LAN: list[IPv4Network | IPv6Network] = [
    IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"),
    IPv6Network("fc00::/7"), IPv6Network("fe80::/10"),
]


class ExtraPort(StrictModel):
    """A port opened by hand. Ports of services are opened automatically; this is for the rest."""

    port: Port = Field(description="Port number.")
    proto: Literal["tcp", "udp"] = Field(default="tcp", description="Protocol.")
    reason: str = Field(min_length=3, description="Why this port must be open (shown in plans).")
    lan_only: bool = Field(default=False, description="Accept only from the LAN networks.")


class FirewallHardening(Control):
    """Default-drop input firewall (IPv4 and IPv6) with nftables."""

    lan: list[IPv4Network | IPv6Network] = Field(
        default_factory=lambda: list(DEFAULT_LAN),
        description="Networks that count as 'the LAN' for services limited to it.",
    )
    extra_ports: list[ExtraPort] = Field(
        default_factory=list, description="Additional open ports, each with a reason."
    )
    log_dropped: bool = Field(
        default=True, description="Log dropped packets (rate-limited) with prefix 'nft-drop: '."
    )

    def ruleset(self, ports: list[OpenPort], ssh_port: int, ssh_rate: int,
                ssh_from: list[IPv4Network | IPv6Network]) -> str:
        lan4 = sorted(str(n) for n in self.lan if n.version == 4)
        lan6 = sorted(str(n) for n in self.lan if n.version == 6)
        src4 = sorted(str(n) for n in ssh_from if n.version == 4)
        src6 = sorted(str(n) for n in ssh_from if n.version == 6)
        out = [
            "#!/usr/sbin/nft -f",
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "# Only the table 'inet selfhost' is replaced; other tables are left alone.",
            "table inet selfhost",
            "delete table inet selfhost",
            "",
            "table inet selfhost {",
        ]
        for name, kind, nets in (("lan4", "ipv4_addr", lan4), ("lan6", "ipv6_addr", lan6)):
            if nets:
                out.append(f"\tset {name} {{ type {kind}; flags interval; "
                           f"elements = {{ {', '.join(nets)} }}; }}")
        out += [
            "\tset ssh_meter4 { type ipv4_addr; flags dynamic; timeout 5m; }",
            "\tset ssh_meter6 { type ipv6_addr; flags dynamic; timeout 5m; }",
            "",
            "\tchain input {",
            "\t\ttype filter hook input priority filter; policy drop;",
            "\t\tct state established,related accept",
            "\t\tct state invalid drop",
            '\t\tiif "lo" accept',
            "\t\tip protocol icmp icmp type { echo-request, destination-unreachable, "
            "time-exceeded, parameter-problem } limit rate 20/second accept",
            "\t\tmeta l4proto 58 icmpv6 type { destination-unreachable, packet-too-big, "
            "time-exceeded, parameter-problem, echo-request, nd-router-solicit, "
            "nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-query, "
            "mld-listener-report, mld2-listener-report } accept",
            "\t\tudp dport 546 ip6 saddr fe80::/10 accept",
            "",
            f"\t\t# ssh: new connections limited to {ssh_rate}/minute per source address",
            f"\t\ttcp dport {ssh_port} ct state new update @ssh_meter4 "
            f"{{ ip saddr limit rate over {ssh_rate}/minute burst {ssh_rate} packets }} drop",
            f"\t\ttcp dport {ssh_port} ct state new update @ssh_meter6 "
            f"{{ ip6 saddr limit rate over {ssh_rate}/minute burst {ssh_rate} packets }} drop",
        ]
        if ssh_from:
            if src4:
                out.append(f"\t\tip saddr {{ {', '.join(src4)} }} tcp dport {ssh_port} accept")
            if src6:
                out.append(f"\t\tip6 saddr {{ {', '.join(src6)} }} tcp dport {ssh_port} accept")
        else:
            out.append(f'\t\ttcp dport {ssh_port} accept comment "ssh"')
        # Group the other ports by (proto, lan_only) and list them with their services.
        groups: dict[tuple[str, bool], dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for p in ports:
            if p.port == ssh_port and p.proto == "tcp":
                continue
            groups[(p.proto, p.lan_only)][p.port].add(p.service)
        for (proto, lan_only), by_port in sorted(groups.items()):
            for port, services in sorted(by_port.items()):
                text = ",".join(sorted(services)).replace('"', "'").replace("\\", "/")[:120]
                comment = f'comment "{text}"'
                if lan_only:
                    if lan4:
                        out.append(f"\t\tip saddr @lan4 {proto} dport {port} accept {comment}")
                    if lan6:
                        out.append(f"\t\tip6 saddr @lan6 {proto} dport {port} accept {comment}")
                else:
                    out.append(f"\t\t{proto} dport {port} accept {comment}")
        if self.log_dropped:
            out.append('\t\tlimit rate 10/minute burst 20 packets log prefix "nft-drop: " level info')
        out += [
            "\t}",
            "",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy drop;",
            "\t}",
            "",
            "\tchain output {",
            "\t\ttype filter hook output priority filter; policy accept;",
            "\t}",
            "}",
        ]
        return "\n".join(out) + "\n"

    def contribute_rules(self, server: Server, target: Target, ports: list[OpenPort]) -> Contribution:
        """Render the ruleset from the merged ports of every contribution."""
        c = Contribution(packages=["nftables"])
        if not self.enabled:
            return c
        ssh = server.hardening.ssh
        all_ports = list(ports)
        for extra in self.extra_ports:
            all_ports.append(OpenPort(extra.port, extra.proto, f"extra: {extra.reason}",
                                      lan_only=extra.lan_only))
        for keep in target.keep_open_ports:
            if keep != ssh.port:
                all_ports.append(OpenPort(keep, "tcp", "ssh-session-in-use"))
        ssh_from = ssh.allow_from if ssh.enabled else []
        c.ports = all_ports[len(ports):]
        c.files.append(
            ManagedFile(NFTABLES_CONF, self.ruleset(all_ports, ssh.port,
                                                    ssh.rate_limit_per_minute, ssh_from),
                        mode="0700", validate="nft -c -f {path}")
        )
        c.units.append(Unit("nftables.service", reload_on=(NFTABLES_CONF,)))
        return c


def network(value: str) -> IPv4Network | IPv6Network:
    return ip_network(value, strict=False)
