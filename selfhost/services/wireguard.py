"""VPN: WireGuard (Debian's wireguard-tools) to reach home from a laptop or a phone.

The server's key pair is generated on the server, once, and its private key never leaves it
(``wg-quick`` reads it from a root-only file at start); peers are listed in the model with
their public keys (each device makes its own pair). ``selfhost vpn-peer FILE NAME`` prints a
peer's configuration and a QR code for the WireGuard app.

The module names no other: it asks for its UDP port, for its tunnel network to count as the
VPN zone (so that services limited to the VPN accept it), and, when peers may reach the
internet through home, for IP forwarding (a sysctl the kernel module writes even if the
kernel hardening control is off), forwarding from the tunnel and NAT in the firewall.

Where the kernel has no WireGuard module (containers on a kernel without it), Debian's
``wireguard-go`` runs the same tunnel in user space over ``/dev/net/tun``: ``wg-quick`` falls
back to it by itself.
"""

from __future__ import annotations

import base64
import binascii
import re
from ipaddress import IPv4Address, IPv4Network
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    Forward,
    HealthCheck,
    Masquerade,
    Port,
    Request,
    Sysctl,
    ZoneNetwork,
)
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import StrictModel
from selfhost.services.base import Service

DIR = "/etc/wireguard"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


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


class WireGuardService(Service):
    """A WireGuard VPN server and its peers."""

    kind: ClassVar[str] = "wireguard"
    uses: ClassVar[tuple[type[Request], ...]] = (Port, ZoneNetwork, Sysctl, Forward, Masquerade,
                                                 BackupSource, HealthCheck)

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
        return [Problem(("services", "wireguard", "peers", i, "route_all"),
                        f"peer {p.name} routes all its traffic through home, but "
                        "internet_access is off")
                for i, p in enumerate(self.peers) if p.route_all and not self.internet_access]

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
        conf = f"{DIR}/{i}.conf"
        c.files.append(ManagedFile(
            template, self.config(), mode="0600",
            validate=f"t=$(mktemp -d) && cp {{path}} \"$t/{i}.conf\" && wg-quick strip "
            f"\"$t/{i}.conf\" >/dev/null; rc=$?; rm -rf \"$t\"; exit $rc"))
        c.commands.append(Command(
            f"wireguard: {conf} from the model's part and the server's key",
            f"umask 077 && {{ sed -n '1,/^\\[Interface\\]/p' {template} && "
            f"printf 'PrivateKey = %s\\n' \"$(cat {DIR}/{i}.key)\" && "
            f"sed '1,/^\\[Interface\\]/d' {template}; }} > {conf}.new && mv {conf}.new {conf}",
            on_change=(template,)))
        c.units.append(Unit(f"wg-quick@{i}.service", reload_on=(template,)))
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
