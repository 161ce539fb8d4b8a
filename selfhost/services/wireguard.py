"""VPN: WireGuard (Debian's wireguard-tools) to reach home from a laptop or a phone.

The server's key pair is generated on the server, once, and its private key never leaves it
(``wg-quick`` reads it from a root-only file at start); peers are listed in the model with
their public keys (each device makes its own pair). ``selfhost vpn-peer FILE NAME`` prints a
peer's configuration and a QR code for the WireGuard app.

The module names no other: it asks for its UDP port, for its tunnel network to count as the
VPN zone (so that services limited to the VPN accept it), and, when peers may reach the
internet through home, for IP forwarding (a sysctl the kernel module writes even if the
kernel hardening control is off), forwarding from the tunnel and NAT in the firewall.

**Tunnels between two hosts of the fleet** (``tunnels: [{host: friend}]``) are declared once,
on one host: each tunnel is its own interface (``wg1`` by default) and UDP port on both ends,
with a small network of its own (the declaring host takes its first address, the other host
the second). Both ends' key pairs come from the controller's key store (generated on the
deploying machine, like the backup's sftp keys), so each end's public key is in the other
end's plan; each private key is uploaded to its host as a secret file, never in the plan, a
log or a command line. This module renders its own end and sends the other host a
:class:`~selfhost.compose.requests.WireGuardTunnel` request, which that host's built-in
:class:`WireGuardTunnels` module renders: its interface, its peer, its UDP port in the
firewall, without anything written in that host's part of the model. Each end connects to
the other's address when the fleet knows it (``addresses``: public, then LAN; or
``endpoint``) and sends a keepalive every 25 s, so a NAT in front of either keeps it open.

Where the kernel has no WireGuard module (containers on a kernel without it), Debian's
``wireguard-go`` runs the same tunnel in user space over ``/dev/net/tun``: ``wg-quick`` falls
back to it by itself.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, field_validator, model_validator

from selfhost.compose.keys import FakeKeyStore
from selfhost.compose.module import Contribution, Env, Module, Problem
from selfhost.compose.requests import (
    BackupSource,
    Forward,
    HealthCheck,
    Masquerade,
    Port,
    Request,
    Sysctl,
    WireGuardTunnel,
    ZoneNetwork,
)
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import StrictModel
from selfhost.services.base import Service

if TYPE_CHECKING:
    from selfhost.models.fleet import Fleet
    from selfhost.models.server import Server

DIR = "/etc/wireguard"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_ENDPOINT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def check_wg_key(value: str) -> str:
    """A WireGuard public key: 32 bytes, base64 (44 characters)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(value) != 44 or len(raw) != 32:
        raise ValueError("not a WireGuard public key (44 base64 characters, from "
                         "`wg pubkey` or the app)")
    return value


class VpnPeer(StrictModel):
    """A device that connects to the VPN."""

    name: str = Field(description="Short name (a-z, 0-9, '-'), e.g. 'alice-phone'.")
    public_key: str = Field(description="The device's WireGuard public key (it keeps its "
                            "private key).")
    address: IPv4Address = Field(description="The device's address in the VPN network.")
    route_all: bool = Field(default=False, description="Send all the device's traffic through "
                            "home (needs `internet_access`), not only the VPN's.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a peer name is 1-31 of a-z 0-9 '-'")
        return v

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_wg_key(v)


class SiteTunnel(StrictModel):
    """A WireGuard tunnel between this host and another host of the same fleet, declared here
    only: the other host gets its end from this declaration."""

    host: str = Field(description="The other host: its name in the fleet (or its host name "
                      "or FQDN).")
    interface: str = Field(default="wg1", pattern=r"^wg[0-9]{1,2}$",
                           description="The tunnel's interface, the same name on both ends "
                           "(another than the VPN's and than any other tunnel's on either "
                           "host).")
    port: int = Field(default=51821, ge=1, le=65535, description="UDP port on both ends "
                      "(opened in both firewalls).")
    network: IPv4Network = Field(default=IPv4Network("10.9.0.0/30"), description="The "
                                 "tunnel's own network: this host takes its first address, the "
                                 "other host the second. It must not overlap a VPN or another "
                                 "tunnel of either host.")
    endpoint: str | None = Field(default=None, description="Name or address at which this "
                                 "host reaches the other one (default: its first public, then "
                                 "LAN address in the fleet; without any, only the other host "
                                 "connects).")
    keepalive: int = Field(default=25, ge=0, le=3600, description="Seconds between keepalive "
                           "packets from each end (keeps a NAT on the way open; 0: none).")
    vpn_zone: bool = Field(default=True, description="The tunnel's network counts as the VPN "
                           "zone on both ends: services limited to the VPN accept the other "
                           "host through the tunnel.")

    @field_validator("network")
    @classmethod
    def _network(cls, v: IPv4Network) -> IPv4Network:
        if v.prefixlen > 31:
            raise ValueError("a tunnel network needs two addresses (a /31 or larger, e.g. "
                             "10.9.0.0/30)")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ip_address(v)
            except ValueError:
                if not _ENDPOINT.match(v) or ".." in v:
                    raise ValueError("a host name or an IP address, without a port (the "
                                     "tunnel's `port` is used)") from None
        return v

    @property
    def addresses(self) -> tuple[IPv4Address, IPv4Address]:
        """(this host's address, the other host's address) in the tunnel."""
        hosts = list(self.network.hosts()) if self.network.prefixlen < 31 else list(self.network)
        return hosts[0], hosts[1]


def key_name(key_dir: str, host: str, interface: str) -> str:
    """Private key of ``host``'s end of the tunnel on ``interface``, in the controller's key
    store (the public key is ``.pub`` next to it). ``~`` is kept: the key store expands it on
    the deploying machine, and the plan does not depend on whose home it is."""
    return str(Path(key_dir) / f"{host}-{interface}")


def fleet_address(server: Server) -> str | None:
    """Where another host reaches ``server``: its first public address, else its first LAN
    address, else none (a name that may not resolve would keep ``wg-quick`` from starting)."""
    for a in (*server.addresses.public, *server.addresses.lan):
        return str(a)
    return None


def endpoint_of(address: str, port: int) -> str:
    try:
        if isinstance(ip_address(address), IPv6Address):
            return f"[{address}]:{port}"
    except ValueError:
        pass
    return f"{address}:{port}"


@dataclass(frozen=True)
class TunnelEnd:
    """One end of a tunnel on a host, for the checks across the fleet."""

    host: str
    """Fleet name of the host it is on."""
    interface: str
    port: int
    network: IPv4Network
    owner: tuple[str, int]
    """(declaring host, index of the tunnel in its list)."""

    def describe(self) -> str:
        return f"{self.owner[0]}'s services.wireguard.tunnels.{self.owner[1]}"


def tunnel_ends(fleet: Fleet) -> list[TunnelEnd]:
    """Every end of every tunnel declared in the fleet (both ends of each)."""
    out: list[TunnelEnd] = []
    for name, server in fleet.hosts.items():
        wg = server.services.wireguard
        if wg is None or not wg.enabled:
            continue
        for i, t in enumerate(wg.tunnels):
            other = fleet.find(t.host)
            if other is None or other == name:
                continue  # refused at its own fields
            for h in (name, other):
                out.append(TunnelEnd(h, t.interface, t.port, t.network, (name, i)))
    return out


class WireGuardService(Service):
    """A WireGuard VPN server and its peers."""

    kind: ClassVar[str] = "wireguard"
    uses: ClassVar[tuple[type[Request], ...]] = (Port, ZoneNetwork, Sysctl, Forward, Masquerade,
                                                 BackupSource, HealthCheck, WireGuardTunnel)

    interface: str = Field(default="wg0", pattern=r"^wg[0-9]{1,2}$",
                           description="Interface name.")
    port: int = Field(default=51820, ge=1, le=65535, description="UDP port.")
    network: IPv4Network = Field(default=IPv4Network("10.8.0.0/24"),
                                 description="The VPN's network; the server takes its first "
                                 "address.")
    endpoint: str | None = Field(default=None, description="Host name (or address) devices "
                                 "connect to, e.g. your public name (default: the server's "
                                 "FQDN).")
    internet_access: bool = Field(default=True, description="Let peers reach the internet "
                                  "through home (IP forwarding and NAT on this server).")
    dns: list[IPv4Address] = Field(default_factory=list, description="DNS servers given to "
                                   "peers (e.g. the LAN resolver's VPN address).")
    peers: list[VpnPeer] = Field(default_factory=list, description="The devices.")
    tunnels: list[SiteTunnel] = Field(default_factory=list, description="Tunnels to other "
                                      "hosts of the fleet, each declared on one of its two "
                                      "hosts only (the other host's end follows).")
    key_dir: str = Field(default="~/.config/selfhost/wireguard-keys", description="Directory "
                         "on the deploying machine where both ends' key pairs of `tunnels` are "
                         "generated and kept (0700; private keys 0600).")

    @model_validator(mode="after")
    def _peers(self) -> WireGuardService:
        seen: dict[str, str] = {}
        server = self.server_address
        for p in self.peers:
            for what, value in (("name", p.name), ("public key", p.public_key),
                                ("address", str(p.address))):
                key = f"{what}:{value}"
                if key in seen:
                    raise ValueError(f"peers {seen[key]} and {p.name} have the same {what}")
                seen[key] = p.name
            if p.address not in self.network or p.address in (server, self.network[0],
                                                              self.network[-1]):
                raise ValueError(f"peer {p.name}: {p.address} is not a free host address of "
                                 f"{self.network} (the server is {server})")
        return self

    @property
    def server_address(self) -> IPv4Address:
        return self.network[1]

    def assertions(self, env: Env) -> list[Problem]:
        out = [Problem(("services", "wireguard", "peers", i, "route_all"),
                       f"peer {p.name} routes all its traffic through home, but "
                       "internet_access is off")
               for i, p in enumerate(self.peers) if p.route_all and not self.internet_access]
        return out + self._tunnel_problems(env)

    def _tunnel_problems(self, env: Env) -> list[Problem]:
        """Each tunnel's mistakes, at its own fields: the other host missing from the fleet
        (or this one), and an interface, a port or a network that one of its two ends shares
        with the VPN or another tunnel end on the same host."""
        out: list[Problem] = []
        fleet = env.fleet
        ends = tunnel_ends(fleet)
        for i, t in enumerate(self.tunnels):
            at: tuple[str | int, ...] = ("services", "wireguard", "tunnels", i)
            other = fleet.find(t.host)
            if other is None:
                out.append(Problem((*at, "host"), f"no host {t.host!r} in this fleet (hosts: "
                                   f"{', '.join(sorted(fleet.hosts))})"))
                continue
            if other == env.host:
                out.append(Problem((*at, "host"), "a tunnel joins two hosts: this one is "
                                   f"{env.host}; name another host of the fleet"))
                continue
            peer = fleet.hosts[other]
            if (t.endpoint is None and fleet_address(peer) is None
                    and fleet_address(env.server) is None):
                out.append(Problem((*at, "endpoint"), f"neither {env.host} nor {other} has an "
                                   "address in the fleet (`addresses`), so neither end knows "
                                   "where to reach the other: give `endpoint`"))
            for h in (env.host, other):
                wg = fleet.hosts[h].services.wireguard
                vpn = wg if wg is not None and wg.enabled else None
                where = "this host's" if h == env.host else f"{h}'s"
                if vpn is not None:
                    if t.interface == vpn.interface:
                        out.append(Problem((*at, "interface"), f"{t.interface} is {where} VPN "
                                           "interface: choose another (e.g. wg2)"))
                    if t.port == vpn.port:
                        out.append(Problem((*at, "port"), f"UDP {t.port} is {where} VPN port: "
                                           "choose another"))
                    if t.network.overlaps(vpn.network):
                        out.append(Problem((*at, "network"), f"{t.network} overlaps {where} VPN "
                                           f"network {vpn.network}: choose another"))
                for e in ends:
                    if e.host != h or e.owner == (env.host, i):
                        continue
                    for field, clash in (("interface", e.interface == t.interface),
                                         ("port", e.port == t.port),
                                         ("network", e.network.overlaps(t.network))):
                        if clash:
                            value = {"interface": t.interface, "port": f"UDP {t.port}",
                                     "network": str(t.network)}[field]
                            out.append(Problem((*at, field), f"{value}: {h} also has "
                                               f"{e.describe()} with the same {field}"
                                               f"{' (overlapping)' if field == 'network' else ''}"
                                               ": choose another"))
        return out

    def requests(self, env: Env) -> list[Request]:
        out: list[Request] = [
            Port(self.port, "udp", "internet", comment="WireGuard"),
            ZoneNetwork("vpn", str(self.network)),
            BackupSource(DIR),  # the server's key: peers keep working after a restore
            HealthCheck("unit", f"wg-quick@{self.interface}.service"),
        ]
        if self.internet_access:
            out += [Sysctl("net.ipv4.ip_forward", "1"),
                    Forward(self.interface, "internet"),
                    Masquerade(str(self.network))]
        for i, t in enumerate(self.tunnels):
            origin = f"{env.path or 'services.wireguard'}.tunnels.{i}"
            other = env.fleet.find(t.host)
            if other is None or other == env.host:
                continue  # refused by the assertions
            out += tunnel_requests(t.interface, t.port, t.network, t.vpn_zone, origin)
            here, there = t.addresses
            back = fleet_address(env.server)
            out.append(WireGuardTunnel(
                on_host=other, peer=env.host, interface=t.interface, port=t.port,
                address=f"{there}/{t.network.prefixlen}", peer_address=str(here),
                peer_endpoint=endpoint_of(back, t.port) if back else "",
                key_name=key_name(self.key_dir, other, t.interface),
                peer_key_name=key_name(self.key_dir, env.host, t.interface),
                keepalive=t.keepalive, vpn_zone=t.vpn_zone, origin=origin))
        return out

    def config(self) -> str:
        lines = [
            "# Managed by selfhost: the VPN server and its peers.",
            "[Interface]",
            f"Address = {self.server_address}/{self.network.prefixlen}",
            f"ListenPort = {self.port}",
        ]
        for p in sorted(self.peers, key=lambda p: p.name):
            lines += ["", "[Peer]", f"# {p.name}", f"PublicKey = {p.public_key}",
                      f"AllowedIPs = {p.address}/32"]
        return "\n".join(lines) + "\n"

    def contribute(self, env: Env) -> Contribution:
        target = env.require_target()
        c = Contribution(packages=["wireguard-tools", "iproute2"])
        if target.in_container:
            c.packages.append("wireguard-go")  # wg-quick's fallback without the kernel module
        i = self.interface
        c.directories.append(ManagedDir(DIR, "0700"))
        c.commands.append(Command(
            f"wireguard: the server's key pair ({DIR}/{i}.key, never printed)",
            f"umask 077 && wg genkey > {DIR}/{i}.key.new && mv {DIR}/{i}.key.new {DIR}/{i}.key",
            unless=f"test -s {DIR}/{i}.key"))
        # The model's part (no key) is the managed file; the configuration wg-quick reads is
        # made from it on the server, with the private key added there, so that a reload
        # (`wg syncconf`: peers change without dropping the tunnel) keeps the key.
        template = f"{DIR}/{i}.conf.selfhost"
        c.files.append(ManagedFile(
            template, self.config(), mode="0600",
            validate=validate_conf(i)))
        c.commands.append(assemble(i, "the server's key", (template,)))
        c.units.append(Unit(f"wg-quick@{i}.service", reload_on=(template,)))
        keys = env.keys or FakeKeyStore()
        for t in self.tunnels:
            other = env.fleet.find(t.host)
            if other is None or other == env.host:
                continue
            here, there = t.addresses
            target_address = t.endpoint or fleet_address(env.fleet.hosts[other])
            mine = key_name(self.key_dir, env.host, t.interface)
            keys.wireguard_public_key(mine)  # the pair exists before the deploy reads it
            c = merge(c, tunnel_end(
                t.interface, t.port, f"{here}/{t.network.prefixlen}", other, str(there),
                endpoint_of(target_address, t.port) if target_address else "",
                keys.wireguard_public_key(key_name(self.key_dir, other, t.interface)),
                mine, t.keepalive, in_container=target.in_container))
        return c

    def peer_config(self, env_endpoint: str, name: str, server_public_key: str) -> str:
        """The configuration of one device, without its private key (which it keeps)."""
        peer = next((p for p in self.peers if p.name == name), None)
        if peer is None:
            raise KeyError(name)
        allowed = "0.0.0.0/0" if peer.route_all else str(self.network)
        lines = ["[Interface]",
                 f"# {peer.name}: paste this device's private key (its public key is in the "
                 "model)",
                 "PrivateKey = <this device's private key>",
                 f"Address = {peer.address}/32"]
        if self.dns:
            lines.append("DNS = " + ", ".join(str(d) for d in self.dns))
        lines += ["", "[Peer]", f"PublicKey = {server_public_key}",
                  f"Endpoint = {self.endpoint or env_endpoint}:{self.port}",
                  f"AllowedIPs = {allowed}", "PersistentKeepalive = 25"]
        return "\n".join(lines) + "\n"


def assemble(interface: str, whose: str, on_change: tuple[str, ...]) -> Command:
    """The command that makes the configuration ``wg-quick`` reads from the model's part (no
    key) and the private key file, on the host: the key never passes through the plan."""
    template = f"{DIR}/{interface}.conf.selfhost"
    conf = f"{DIR}/{interface}.conf"
    return Command(
        f"wireguard: {conf} from the model's part and {whose}",
        f"umask 077 && {{ sed -n '1,/^\\[Interface\\]/p' {template} && "
        f"printf 'PrivateKey = %s\\n' \"$(cat {DIR}/{interface}.key)\" && "
        f"sed '1,/^\\[Interface\\]/d' {template}; }} > {conf}.new && mv {conf}.new {conf}",
        on_change=on_change, creates=(conf,))


def validate_conf(interface: str) -> str:
    """Check a staged configuration with ``wg-quick strip`` (it reads a file named after the
    interface)."""
    return (f"t=$(mktemp -d) && cp {{path}} \"$t/{interface}.conf\" && wg-quick strip "
            f"\"$t/{interface}.conf\" >/dev/null; rc=$?; rm -rf \"$t\"; exit $rc")


def tunnel_requests(interface: str, port: int, network: IPv4Network | str, vpn_zone: bool,
                    origin: str) -> list[Request]:
    """What one end of a tunnel asks of the others: its UDP port, its network as the VPN
    zone (if asked), a health check of its unit."""
    out: list[Request] = [
        Port(port, "udp", "internet", comment=f"WireGuard tunnel {interface}", origin=origin),
        HealthCheck("unit", f"wg-quick@{interface}.service", origin=origin),
    ]
    if vpn_zone:
        out.append(ZoneNetwork("vpn", str(network), origin=origin))
    return out


def tunnel_config(interface: str, port: int, address: str, peer: str, peer_address: str,
                  endpoint: str, peer_public_key: str, keepalive: int) -> str:
    """The model's part (no private key) of one end's configuration."""
    lines = [
        f"# Managed by selfhost: the tunnel {interface} between this host and {peer}.",
        "[Interface]",
        f"Address = {address}",
        f"ListenPort = {port}",
        "",
        "[Peer]",
        f"# {peer}",
        f"PublicKey = {check_wg_key(peer_public_key)}",
        f"AllowedIPs = {peer_address}/32",
    ]
    if endpoint:
        lines.append(f"Endpoint = {endpoint}")
    if keepalive:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n"


def tunnel_end(interface: str, port: int, address: str, peer: str, peer_address: str,
               endpoint: str, peer_public_key: str, key_file: str, keepalive: int,
               in_container: bool) -> Contribution:
    """One end of a tunnel on its host: the private key from the controller's key store
    (uploaded as a secret file), the model's part of the configuration, the configuration
    made from both on the host, and the interface's unit."""
    c = Contribution(packages=["wireguard-tools", "iproute2"])
    if in_container:
        c.packages.append("wireguard-go")
    c.directories.append(ManagedDir(DIR, "0700"))
    key = f"{DIR}/{interface}.key"
    template = f"{DIR}/{interface}.conf.selfhost"
    c.files.append(ManagedFile(key, "", mode="0600", secret_file=key_file))
    c.files.append(ManagedFile(
        template, tunnel_config(interface, port, address, peer, peer_address, endpoint,
                                peer_public_key, keepalive),
        mode="0600", validate=validate_conf(interface)))
    c.commands.append(assemble(interface, "this end's key", (template, key)))
    c.units.append(Unit(f"wg-quick@{interface}.service", reload_on=(template, key)))
    return c


def merge(a: Contribution, b: Contribution) -> Contribution:
    """Two contributions of one module as one (packages and directories once)."""
    return Contribution(
        packages=a.packages + [p for p in b.packages if p not in a.packages],
        directories=a.directories + [d for d in b.directories if d not in a.directories],
        files=a.files + b.files, units=a.units + b.units, commands=a.commands + b.commands,
        sync_dirs=a.sync_dirs + b.sync_dirs)


class WireGuardTunnels(Module):
    """Provider of :class:`WireGuardTunnel` requests: this host's ends of the tunnels that
    other hosts of the fleet declare to it (nothing when none does). The checks (interfaces,
    ports and networks that must differ from this host's) are made where the tunnel is
    declared, at its fields."""

    provides: ClassVar[tuple[type[Request], ...]] = (WireGuardTunnel,)
    uses: ClassVar[tuple[type[Request], ...]] = (Port, ZoneNetwork, HealthCheck)

    def requests(self, env: Env) -> list[Request]:
        out: list[Request] = []
        for r in self._incoming(env):
            out += tunnel_requests(r.interface, r.port, IPv4Network(r.address, strict=False),
                                   r.vpn_zone, origin=env.path or "wireguard-tunnels")
        return out

    @staticmethod
    def _incoming(env: Env) -> list[WireGuardTunnel]:
        return sorted(env.incoming(WireGuardTunnel), key=lambda r: r.interface)

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        reqs = self._incoming(env)
        if not reqs:
            return c
        target = env.require_target()
        keys = env.keys or FakeKeyStore()
        for r in reqs:
            keys.wireguard_public_key(r.key_name)  # the pair exists before the deploy reads it
            c = merge(c, tunnel_end(
                r.interface, r.port, r.address, r.peer, r.peer_address, r.peer_endpoint,
                keys.wireguard_public_key(r.peer_key_name), r.key_name, r.keepalive,
                in_container=target.in_container))
        return c
