"""nftables firewall: default drop, ports derived from SSH and the enabled services.

The provider of :class:`~selfhost.compose.requests.Port` (in a zone: internet, LAN, VPN),
:class:`~selfhost.compose.requests.Forward` and :class:`~selfhost.compose.requests.Masquerade`
requests. The fleet's own hosts are exempt from the SSH rate limit.

Only selfhost's own table (``inet selfhost``) is replaced, so rules that other software
(podman, libvirt, a VPN) adds in its own tables are left alone. Every ruleset is checked
with ``nft -c`` before it is loaded; the SSH port in use is always open.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    Forward,
    LoopbackGuard,
    Masquerade,
    Request,
    ZoneNetwork,
)
from selfhost.compose.requests import Port as PortRequest
from selfhost.compose.resources import ManagedFile, Unit
from selfhost.compose.route import loc_of
from selfhost.hardening.base import Control
from selfhost.models.base import Port, StrictModel

if TYPE_CHECKING:
    pass

NFTABLES_CONF = "/etc/nftables.conf"

DEFAULT_LAN: list[IPv4Network | IPv6Network] = [
    IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"),
    IPv6Network("fc00::/7"), IPv6Network("fe80::/10"),
]


NFT_KEYWORDS = frozenset({"list", "table", "chain", "set", "map", "meta", "counter", "log",
                          "limit", "quota", "reject", "drop", "accept", "queue", "mark", "flow"})
"""User names that nft reads as keywords (Debian's ``list``, Mailman's user): quoted."""


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
    vpn: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description="Networks that count as 'the VPN' for services limited to it (a VPN "
        "module adds its own tunnel network).",
    )
    extra_ports: list[ExtraPort] = Field(
        default_factory=list, description="Additional open ports, each with a reason."
    )
    log_dropped: bool = Field(
        default=True, description="Log dropped packets (rate-limited) with prefix 'nft-drop: '."
    )

    provides: ClassVar[tuple[type[Request], ...]] = (PortRequest, Forward, Masquerade,
                                                     LoopbackGuard, ZoneNetwork)

    def zone_networks(self, env: Env, zone: str) -> list[IPv4Network | IPv6Network]:
        """The networks of a zone: the model's, and those other modules bring (a VPN)."""
        own = list(self.lan if zone == "lan" else self.vpn)
        for z in env.incoming(ZoneNetwork):
            net = network(z.network)
            if z.zone == zone and net not in own:
                own.append(net)
        return own

    def requests(self, env: Env) -> list[Request]:
        return [PortRequest(e.port, e.proto, "lan" if e.lan_only else "internet",
                            comment=f"extra: {e.reason}",
                            origin=f"{env.path}.extra_ports.{i}.port")
                for i, e in enumerate(self.extra_ports)]

    def assertions(self, env: Env) -> list[Problem]:
        out: list[Problem] = []
        for p in env.incoming(PortRequest):
            if p.zone == "lan" and self.enabled and not self.zone_networks(env, "lan"):
                out.append(Problem(loc_of(p.origin), f"{p.describe()} is for the LAN only, but "
                                   "hardening.firewall.lan lists no network"))
            if p.zone == "vpn" and self.enabled and not self.zone_networks(env, "vpn"):
                out.append(Problem(loc_of(p.origin), f"{p.describe()} is for the VPN only, but "
                                   "there is no VPN (no VPN service, and hardening.firewall.vpn "
                                   "is empty)"))
        if not self.enabled:
            for r in [*env.incoming(Forward), *env.incoming(Masquerade)]:
                out.append(Problem(loc_of(r.origin), f"{r.describe()} needs the firewall, but "
                                   f"hardening.firewall is off ({self.reason})"))
            for p in env.incoming(PortRequest):
                if p.zone != "internet":
                    out.append(Problem(loc_of(p.origin), f"{p.describe()} should be reachable "
                                       f"from the {p.zone.upper()} only, but hardening.firewall "
                                       f"is off ({self.reason}): it is open to everyone",
                                       severity="warning"))
        return out

    def ruleset(self, ports: list[PortRequest], ssh_port: int, ssh_rate: int,
                ssh_from: list[IPv4Network | IPv6Network], trusted: list[str] | None = None,
                forwards: list[Forward] | None = None,
                masquerades: list[Masquerade] | None = None,
                guards: list[LoopbackGuard] | None = None,
                zones: dict[str, list[IPv4Network | IPv6Network]] | None = None) -> str:
        def split(nets: list[IPv4Network | IPv6Network]) -> tuple[list[str], list[str]]:
            return (sorted(str(n) for n in nets if n.version == 4),
                    sorted(str(n) for n in nets if n.version == 6))

        zones = zones or {}
        lan4, lan6 = split(zones.get("lan", self.lan))
        vpn4, vpn6 = split(zones.get("vpn", self.vpn))
        src4, src6 = split(ssh_from)
        fleet4, fleet6 = split([network(a) for a in trusted or []])
        out = [
            "#!/usr/sbin/nft -f",
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "# Only the tables 'inet selfhost' and 'ip selfhost_nat' are replaced; other tables",
            "# are left alone.",
            "table inet selfhost",
            "delete table inet selfhost",
            "table ip selfhost_nat",
            "delete table ip selfhost_nat",
            "",
            "table inet selfhost {",
        ]
        sets = (("lan4", "ipv4_addr", lan4), ("lan6", "ipv6_addr", lan6),
                ("vpn4", "ipv4_addr", vpn4), ("vpn6", "ipv6_addr", vpn6),
                ("fleet4", "ipv4_addr", fleet4), ("fleet6", "ipv6_addr", fleet6))
        for name, kind, nets in sets:
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
        ]
        if fleet4 or fleet6:
            out.append("\t\t# ssh from the fleet's own hosts: never rate-limited")
            if fleet4:
                out.append(f"\t\tip saddr @fleet4 tcp dport {ssh_port} accept")
            if fleet6:
                out.append(f"\t\tip6 saddr @fleet6 tcp dport {ssh_port} accept")
        out += [
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
        # Group the other ports by (proto, zone) and list them with who asked.
        groups: dict[tuple[str, str], dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for p in ports:
            if p.port == ssh_port and p.proto == "tcp":
                continue
            groups[(p.proto, p.zone)][p.port].add(_who(p))
        zone_sets = {"lan": ("lan4" if lan4 else None, "lan6" if lan6 else None),
                     "vpn": ("vpn4" if vpn4 else None, "vpn6" if vpn6 else None)}
        for (proto, zone), by_port in sorted(groups.items()):
            for port, services in sorted(by_port.items()):
                text = ",".join(sorted(services)).replace('"', "'").replace("\\", "/")[:120]
                comment = f'comment "{text}"'
                if zone == "internet":
                    out.append(f"\t\t{proto} dport {port} accept {comment}")
                    continue
                set4, set6 = zone_sets[zone]
                if set4:
                    out.append(f"\t\tip saddr @{set4} {proto} dport {port} accept {comment}")
                if set6:
                    out.append(f"\t\tip6 saddr @{set6} {proto} dport {port} accept {comment}")
        if self.log_dropped:
            out.append('\t\tlimit rate 10/minute burst 20 packets log prefix "nft-drop: " level info')
        out += [
            "\t}",
            "",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy drop;",
        ]
        if forwards:
            out.append("\t\tct state established,related accept")
            for f in sorted(forwards, key=lambda f: (f.from_interface, f.to)):
                rule = f'\t\tiifname "{f.from_interface}"'
                out.append(f'{rule} accept comment "{_who(f)}"')
        out += [
            "\t}",
            "",
            "\tchain output {",
            "\t\ttype filter hook output priority filter; policy accept;",
        ]
        for g in sorted(guards or [], key=lambda g: g.port):
            users = ", ".join(f'"{u}"' if u in NFT_KEYWORDS else u for u in g.users)
            out.append(f"\t\toif \"lo\" tcp dport {g.port} meta skuid != {{ {users} }} "
                       f'reject with tcp reset comment "{_who(g)}"')
        out += [
            "\t}",
            "}",
        ]
        if masquerades:
            out += ["", "table ip selfhost_nat {", "\tchain postrouting {",
                    "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
            for m in sorted(masquerades, key=lambda m: m.network):
                out.append(f'\t\tip saddr {m.network} masquerade comment "{_who(m)}"')
            out += ["\t}", "}"]
        return "\n".join(out) + "\n"

    def contribute(self, env: Env) -> Contribution:
        """Render the ruleset from every module's port, forward and NAT requests."""
        server, target = env.server, env.require_target()
        c = Contribution(packages=["nftables"])
        if not self.enabled:
            return c
        ssh = server.hardening.ssh
        ports = list(env.incoming(PortRequest))
        for keep in target.keep_open_ports:
            if keep != ssh.port:
                ports.append(PortRequest(keep, "tcp", origin="ssh-session-in-use"))
        ssh_from = ssh.allow_from if ssh.enabled else []
        from selfhost.hardening.fail2ban import trusted_addresses

        c.files.append(
            ManagedFile(NFTABLES_CONF, self.ruleset(
                ports, ssh.port, ssh.rate_limit_per_minute, ssh_from,
                trusted=trusted_addresses(env), forwards=env.incoming(Forward),
                masquerades=env.incoming(Masquerade), guards=env.incoming(LoopbackGuard),
                zones={z: self.zone_networks(env, z) for z in ("lan", "vpn")}),
                mode="0700", validate="nft -c -f {path}")
        )
        c.units.append(Unit("nftables.service", reload_on=(NFTABLES_CONF,)))
        return c


def _who(r: Request) -> str:
    """A short name of the requester for rule comments (``services.web`` -> ``web``)."""
    parts = r.origin.split(".")
    if parts[0] in ("services", "hardening") and len(parts) > 1:
        name = parts[1]
        if r.origin.startswith("hardening.firewall.extra_ports") and isinstance(r, PortRequest):
            return r.comment or "extra"
        return name
    return r.origin


@lru_cache(maxsize=65536)
def network(value: str) -> IPv4Network | IPv6Network:
    # Cached: every host of an N-host fleet parses the N fleet addresses again (the networks
    # are immutable, so sharing them is safe).
    return ip_network(value, strict=False)
