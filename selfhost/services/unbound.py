"""LAN resolver: Unbound (Debian's package), a validating, recursive, caching DNS resolver
for the home network and the VPN, with split-horizon names and optional blocklists.

Where it answers. Unbound listens on this host's own LAN and VPN addresses from the model
(``addresses.lan``, ``addresses.vpn``), never on the wildcard address and never in the
internet zone: the module asks for port 53 (UDP and TCP) in the ``lan`` and ``vpn`` zones
only, and Unbound's ``access-control`` refuses every source but the networks of those zones
(``hardening.firewall.lan``/``vpn`` and the VPN module's tunnel network) and the host's own
addresses, so a firewall that is off or opened by hand still does not make it an open
resolver. ``ip-freebind`` lets it bind the VPN address before the tunnel is up.

The host's own resolution is left alone, on purpose. Binding only the model's addresses
(not ``0.0.0.0:53``) avoids port-53 conflicts with what may already listen on this host:
systemd-resolved's stub on 127.0.0.53/127.0.0.54, the dnsmasq of libvirt or podman on their
bridge addresses, a container runtime's DNS. Debian's ``unbound-resolvconf`` helper is
switched off (``RESOLVCONF=false`` in ``/etc/default/unbound``), so installing Unbound never
rewrites ``/etc/resolv.conf``: the server keeps resolving through what it used before (the
router, systemd-resolved, the container runtime), and a broken or stopped resolver cannot
cut the server off from Debian's mirrors or from the next deploy that would repair it. Point
the server at itself by hand if you want to (its LAN address is allowed). Port 53 is this
module's on these addresses: another DNS server on the same host (an authoritative one)
must bind other addresses (``services.dns.listen``), or it is reported as a port conflict.

DNSSEC. Unbound validates with Debian's root trust anchor: the ``dns-root-data`` package's
``/usr/share/dns/root.key``, which Debian's unit copies to ``/var/lib/unbound/root.key``
(``auto-trust-anchor-file``, kept up to date by RFC 5011 while the server is online). The
package only recommends ``dns-root-data``; without it Unbound does not start, so it is
installed explicitly. Nothing is downloaded at deploy time. ``trust_anchors`` adds anchors
for zones that are not signed from the root (a home zone signed by its own key), served by
the authoritative servers named in ``stub_zones`` (made ``transparent`` local zones, since
Unbound otherwise answers names under ``test.``, ``home.arpa.``... itself and never asks
them). A validation failure is logged with its reason and returned in the SERVFAIL answer
as an Extended DNS Error (RFC 8914).

Split horizon. At home, the server's own names resolve to its LAN address (and, for VPN
clients, to its VPN address): its FQDN, every virtual host other modules asked of the web
server, and every CNAME to it that modules published. Each zone's clients get their own
addresses (an Unbound ``view`` per zone), other record types for those names get an empty
answer (no public AAAA that would bypass home), and every other name resolves normally.
``names`` adds other devices (a printer, a NAS). ``blocklist`` names (and everything under
them) answer NXDOMAIN, for ads and trackers; the list is the model's, nothing is fetched.

The configuration is one drop-in, ``/etc/unbound/unbound.conf.d/selfhost.conf``, next to
Debian's own (root trust anchor, remote control on a Unix socket). It is checked with
``unbound-checkconf`` together with Debian's drop-ins before it replaces the live one, and
Unbound is restarted when it changed (a restart re-binds the listening addresses).
"""

from __future__ import annotations

import base64
import binascii
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import DnsRecord, HealthCheck, Port, Request, VirtualHost
from selfhost.compose.resources import ManagedFile, Unit
from selfhost.models.base import StrictModel
from selfhost.services.base import Service

CONF_DIR = "/etc/unbound/unbound.conf.d"
CONFIG = f"{CONF_DIR}/selfhost.conf"
DEFAULTS = "/etc/default/unbound"
ZoneName = Literal["lan", "vpn"]
ZONES: tuple[ZoneName, ...] = ("lan", "vpn")

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_HOST_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")

# unbound-checkconf on the staged file together with Debian's other drop-ins (the live
# selfhost.conf left out: its views and zones would be defined twice).
VALIDATE = (
    f't=$(mktemp) && for f in {CONF_DIR}/*.conf; do [ "$f" = {CONFIG} ] || '
    "printf 'include-toplevel: \"%s\"\\n' \"$f\"; done > \"$t\" && "
    "printf 'include-toplevel: \"%s\"\\n' {path} >> \"$t\" && unbound-checkconf \"$t\"; "
    'rc=$?; rm -f "$t"; exit $rc'
)


def check_domain_name(value: str) -> str:
    """A domain name as a blocklist or a stub zone gives it: lowercase, no trailing dot."""
    v = value.strip().lower().rstrip(".")
    if not v:
        raise ValueError("an empty name")
    if "://" in v or "/" in v:
        raise ValueError(f"{value!r} is a URL: give the domain name only (e.g. ads.example.com)")
    if v.startswith("*."):
        raise ValueError(f"{value!r}: no wildcards; a name blocks everything under it too, "
                         f"write {v[2:]!r}")
    if any(c.isspace() for c in v):
        raise ValueError(f"{value!r} contains spaces (a hosts-file line? give the name only)")
    if not _NAME_RE.match(v):
        raise ValueError(f"{value!r} is not a domain name: labels of 1-63 letters, digits, "
                         "'-' or '_', separated by single dots")
    if v.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{value!r} looks like an IP address, not a domain name")
    return v


def check_host_name(value: str) -> str:
    v = value.strip().lower().rstrip(".")
    if not _HOST_RE.match(v) or len(v) > 253:
        raise ValueError(f"{value!r} is not a host name (labels of a-z, 0-9 and '-', "
                         "separated by dots)")
    return v


DomainName = Annotated[str, AfterValidator(check_domain_name)]


def check_trust_anchor(value: str) -> str:
    """A DS or DNSKEY record in zone-file form, e.g. from ``ldns-key2ds`` or
    ``dig DNSKEY``: ``NAME [TTL] [IN] DS KEYTAG ALGORITHM DIGESTTYPE DIGEST``."""
    tokens = value.split()
    if len(tokens) >= 2 and tokens[1].isdigit():
        tokens.pop(1)  # a TTL
    if len(tokens) >= 2 and tokens[1].upper() == "IN":
        tokens.pop(1)
    usage = ("a trust anchor is a DS or DNSKEY record: 'NAME. DS KEYTAG ALGORITHM DIGESTTYPE "
             "HEXDIGEST' or 'NAME. DNSKEY 257 3 ALGORITHM BASE64KEY'")
    if len(tokens) < 6 or tokens[1].upper() not in ("DS", "DNSKEY"):
        raise ValueError(usage)
    name = tokens[0].lower()
    if name != ".":
        check_domain_name(name)
        name = name.rstrip(".") + "."
    kind = tokens[1].upper()
    nums, rest = tokens[2:5], "".join(tokens[5:])
    if not all(n.isdigit() for n in nums):
        raise ValueError(usage)
    if kind == "DS":
        if int(nums[0]) > 65535 or not re.fullmatch(r"[0-9a-fA-F]{40,128}", rest):
            raise ValueError(usage + " (the key tag is 0-65535, the digest hexadecimal)")
        rest = rest.upper()
    else:
        if nums[1] != "3":
            raise ValueError(usage + " (the protocol field of a DNSKEY is always 3)")
        try:
            if len(base64.b64decode(rest, validate=True)) < 32:
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError(usage + " (the key is not base64)") from None
    return f"{name} {kind} {' '.join(nums)} {rest}"


class LocalName(StrictModel):
    """A device of the home network that the resolver answers for."""

    name: str = Field(description="Host name: a label under the server's domain ('printer') "
                      "or a full name.")
    addresses: list[IPv4Address | IPv6Address] = Field(
        default_factory=list, description="Its addresses (at least one).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_host_name(v)

    @model_validator(mode="after")
    def _has_address(self) -> LocalName:
        if not self.addresses:
            raise ValueError(f"the name {self.name!r} has no address: give its addresses "
                             "(e.g. [192.168.1.20])")
        return self


class StubZone(StrictModel):
    """A zone served by an authoritative server you run (asked directly, not through the
    internet): a home zone, or a signed zone whose anchor is in ``trust_anchors``."""

    name: DomainName = Field(description="The zone, e.g. 'lab.example.org'.")
    addresses: list[IPv4Address | IPv6Address] = Field(
        min_length=1, description="Addresses of its authoritative servers.")


class UnboundService(Service):
    """A validating, caching DNS resolver for the LAN and the VPN, with split-horizon names."""

    kind: ClassVar[str] = "resolver"
    uses: ClassVar[tuple[type[Request], ...]] = (Port, HealthCheck)

    zones: list[Literal["lan", "vpn"]] = Field(
        default_factory=lambda: list(ZONES), min_length=1,
        description="Where it answers: the 'lan', the 'vpn', or both (on this host's "
        "addresses of those zones, `addresses.lan`/`addresses.vpn`). Never the internet.")
    names: list[LocalName] = Field(
        default_factory=list,
        description="Other devices it answers for at home (the server's own names, its FQDN "
        "and its services' host names, are always answered with its own LAN/VPN address).")
    blocklist: list[DomainName] = Field(
        default_factory=list,
        description="Domains answered NXDOMAIN, with everything under them (ads, trackers), "
        "e.g. ['ads.example.com']. The list is the model's: nothing is downloaded.")
    stub_zones: list[StubZone] = Field(
        default_factory=list,
        description="Zones asked directly of your own authoritative servers.")
    trust_anchors: list[Annotated[str, AfterValidator(check_trust_anchor)]] = Field(
        default_factory=list,
        description="Extra DNSSEC trust anchors (DS or DNSKEY records) for zones not signed "
        "from the root, e.g. 'lab.example.org. DS 12345 13 2 ABCD...'. The root's comes from "
        "Debian (dns-root-data).")

    @field_validator("zones")
    @classmethod
    def _zones(cls, v: list[Literal["lan", "vpn"]]) -> list[Literal["lan", "vpn"]]:
        return [z for z in ZONES if z in v]

    @model_validator(mode="after")
    def _unique(self) -> UnboundService:
        for what, values in (("names", [n.name for n in self.names]),
                             ("stub_zones", [s.name for s in self.stub_zones])):
            dup = sorted({n for n in values if values.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: listed twice: {', '.join(dup)}")
        return self

    # ------------------------------------------------------------------ what it answers

    def listen(self, env: Env) -> dict[ZoneName, list[IPv4Address | IPv6Address]]:
        """This host's addresses by zone, for the zones it answers in."""
        a = env.server.addresses
        return {z: list(a.lan if z == "lan" else a.vpn) for z in self.zones
                if (a.lan if z == "lan" else a.vpn)}

    def fqdn(self, name: str, domain: str) -> str:
        """A name of ``names``: a single label is under the server's domain."""
        return name if "." in name else f"{name}.{domain}"

    def own_names(self, env: Env) -> list[str]:
        """The server's own names: its FQDN, the virtual hosts of its web server, the CNAMEs
        to it that modules publish."""
        server = env.server
        names = {server.fqdn}
        names.update(v.host for v in env.incoming(VirtualHost))
        names.update(r.name.rstrip(".") for r in env.incoming(DnsRecord)
                     if r.type == "CNAME" and r.value.rstrip(".") == server.fqdn)
        return sorted(names)

    def extra_names(self, env: Env) -> list[tuple[int, str, list[IPv4Address | IPv6Address]]]:
        return [(i, self.fqdn(n.name, env.server.domain), n.addresses)
                for i, n in enumerate(self.names)]

    def networks(self, env: Env, zone: str) -> list[IPv4Network | IPv6Network]:
        return env.server.hardening.firewall.zone_networks(env, zone)

    # ------------------------------------------------------------------ module hooks

    def requests(self, env: Env) -> list[Request]:
        listen = self.listen(env)
        out: list[Request] = []
        for zone, addrs in listen.items():
            bind = tuple(str(a) for a in addrs)
            out += [Port(53, "udp", zone, comment="DNS", bind=bind),
                    Port(53, "tcp", zone, comment="DNS", bind=bind)]
        out.append(HealthCheck("unit", "unbound.service"))
        first = next((a for addrs in listen.values() for a in addrs), None)
        if first is not None:
            host = f"[{first}]" if first.version == 6 else str(first)
            out.append(HealthCheck("tcp", f"{host}:53"))
        return out

    def assertions(self, env: Env) -> list[Problem]:
        me = ("services", "resolver")
        out: list[Problem] = []
        listen = self.listen(env)
        if not listen:
            zones = " or ".join(f"addresses.{z}" for z in self.zones)
            out.append(Problem((*me, "zones"), "the resolver answers the "
                               f"{' and the '.join(z.upper() for z in self.zones)} only, but "
                               f"this host has no address there: set {zones} (e.g. lan: "
                               "[192.168.1.10])"))
        if "vpn" in self.zones and "vpn" not in listen and self.networks(env, "vpn"):
            out.append(Problem((*me, "zones"), "there is a VPN, but this host has no VPN "
                               "address for the resolver to listen on: set addresses.vpn "
                               "(e.g. the VPN server's 10.8.0.1), or zones: [lan]"))
        own = set(self.own_names(env))
        for i, name, _ in self.extra_names(env):
            if name in own:
                out.append(Problem((*me, "names", i, "name"), f"{name} is one of this "
                                   "server's own names: it already resolves to the server "
                                   "at home"))
        answered = sorted(own | {n for _, n, _ in self.extra_names(env)})
        for i, blocked in enumerate(self.blocklist):
            hit = [n for n in answered if n == blocked or n.endswith("." + blocked)]
            if hit:
                out.append(Problem((*me, "blocklist", i), f"{blocked} would block "
                                   f"{', '.join(hit[:3])}, which the resolver answers at home"))
        for i, stub in enumerate(self.stub_zones):
            hit = [n for n in answered if n == stub.name or n.endswith("." + stub.name)]
            if hit:
                out.append(Problem((*me, "stub_zones", i, "name"), f"{stub.name} contains "
                                   f"{', '.join(hit[:3])}, which the resolver answers itself"))
        return out

    def config(self, env: Env) -> str:
        listen = self.listen(env)
        own_addresses = sorted({a for addrs in listen.values() for a in addrs},
                               key=lambda a: (a.version, a))
        lines = [
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "# The LAN/VPN resolver. Debian's other drop-ins here add the root trust anchor",
            "# (auto-trust-anchor-file) and remote control on a Unix socket.",
            "server:",
            "    # Only this host's LAN/VPN addresses: never the wildcard, never loopback",
            "    # (systemd-resolved, dnsmasq or a container runtime may hold port 53 there).",
        ]
        lines += [f"    interface: {a}" for a in own_addresses]
        lines += [
            "    port: 53",
            "    # Bind the VPN address even before the tunnel is up.",
            "    ip-freebind: yes",
            "    hide-identity: yes",
            "    hide-version: yes",
            "    qname-minimisation: yes",
            "    prefetch: yes",
            "    # A DNSSEC validation failure: one log line with its reason, and the reason",
            "    # in the SERVFAIL answer (Extended DNS Errors, RFC 8914).",
            "    val-log-level: 2",
            "    ede: yes",
            "",
            "    # Who may ask: the LAN/VPN networks and this host, nobody else.",
            "    access-control: 0.0.0.0/0 refuse",
            "    access-control: ::/0 refuse",
            "    access-control: 127.0.0.0/8 refuse",
            "    access-control: ::1/128 refuse",
        ]
        views: dict[ZoneName, list[IPv4Network | IPv6Network]] = {}
        allowed: list[str] = []
        for zone in self.zones:
            nets = list(self.networks(env, zone))
            if nets or zone in listen:
                views[zone] = nets
            for n in nets:
                if str(n) not in allowed:
                    allowed.append(str(n))
        # This host, through its own addresses (a /32 entry is its own access-control element:
        # it needs its zone's view too).
        for zone, addrs in listen.items():
            for a in addrs:
                net = ip_network(a)
                if str(net) not in allowed:
                    allowed.append(str(net))
                    views[zone].append(net)
        lines += [f"    access-control: {n} allow" for n in allowed]
        for zone, nets in views.items():
            lines += [f"    access-control-view: {n} {zone}" for n in nets]
        extra = self.extra_names(env)
        if extra or own_addresses:
            lines += ["", "    # Names answered at home (the server's own: per zone, below)."]
        for _, name, addrs in extra:
            lines += [_record(name, a) for a in addrs]
        for a in own_addresses:
            lines.append(f'    local-data-ptr: "{a} {env.server.fqdn}"')
        if self.stub_zones:
            lines += ["", "    # Zones of your own authoritative servers: resolved, even under",
                      "    # names Unbound serves locally by default (home.arpa, test, ...)."]
            lines += [f'    local-zone: "{s.name}." transparent' for s in self.stub_zones]
        if self.trust_anchors:
            lines += ["", "    # Trust anchors of zones not signed from the root."]
            lines += [f'    trust-anchor: "{t}"' for t in self.trust_anchors]
        if self.blocklist:
            lines += ["", "    # Blocklist: these names and everything under them."]
            lines += [f'    local-zone: "{b}." always_nxdomain' for b in sorted(set(self.blocklist))]
        names = self.own_names(env)
        for zone in views:
            addrs = listen.get(zone) or [a for z in ZONES for a in listen.get(z, [])]
            lines += ["", "# The server's own names, for the clients of this zone.", "view:",
                      f'    name: "{zone}"', "    view-first: yes"]
            lines += [_record(n, a) for n in names for a in addrs]
        for s in self.stub_zones:
            lines += ["", "stub-zone:", f'    name: "{s.name}."']
            lines += [f"    stub-addr: {a}" for a in s.addresses]
        return "\n".join(lines) + "\n"

    def contribute(self, env: Env) -> Contribution:
        c = Contribution(packages=["unbound", "dns-root-data"])
        c.files.append(ManagedFile(
            DEFAULTS, "# Managed by selfhost.\n"
            "# Unbound serves the LAN/VPN: it does not become this host's own resolver\n"
            "# (/etc/resolv.conf is left alone).\nRESOLVCONF=false\n"
            "# The root trust anchor from Debian's dns-root-data.\n"
            "ROOT_TRUST_ANCHOR_UPDATE=true\n"))
        c.files.append(ManagedFile(CONFIG, self.config(env), validate=VALIDATE))
        c.units.append(Unit("unbound.service", reload_on=(CONFIG, DEFAULTS), reload=False))
        return c


def _record(name: str, address: IPv4Address | IPv6Address) -> str:
    kind = "A" if address.version == 4 else "AAAA"
    return f'    local-data: "{name}. {kind} {address}"'

