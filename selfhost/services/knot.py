"""Authoritative DNS: Knot DNS (Debian's ``knot``) serves the model's zones, signs them with
DNSSEC, and a friend's host of the fleet serves them as a secondary.

Why Knot: automatic DNSSEC signing and key rollovers are built in (no cron of ``dnssec-*``
tools as with BIND, no separate signer as with NSD + OpenDNSSEC), its configuration checks
itself (``knotc conf-check``, ``kzonecheck``), and Debian ships it on both releases.

The zone holds the records the model's modules request (``selfhost dns`` prints the same):
the hosts' A/AAAA, the web names, CAA, mail's MX, SPF, DMARC... Nobody writes a zone file.
The rendered file has a fixed serial: Knot loads it as a difference against what it serves
(``zonefile-load: difference-no-serial``), numbers each change itself (``serial-policy:
unixtime``) and keeps the signed zone in its journal, never writing back into the file; so a
second deploy changes nothing and a change reaches the secondaries by NOTIFY and IXFR.
Records whose value is made on this host (a DKIM public key, ``DnsRecord.from_host``) are
added on the host: the rendered file is then the zone's template (``ZONE.zone.in``), and a
guarded command appends the values read by the records' own commands, checks the result with
``kzonecheck`` and, when it differs from the live ``ZONE.zone``, installs it and has Knot reload
the zone (which signs the change and NOTIFYs the secondaries). A value not there yet (no key
generated) is left out until a later deploy finds it. The provider never knows which module
asked: a record only says how to read its value on the host.

Secondaries: ``secondaries: [friend]`` asks the friend's host (a host of the same fleet) to
transfer the zone from this one. Knot on both sides only accepts NOTIFY and transfers from
the other's addresses (``automatic-acl``). Knot on a host is configured by one provider
(:class:`KnotServer`): a host can be the primary of its zones and the secondary of others'.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env, Module, Problem
from selfhost.compose.requests import (
    BackupSource,
    DnsRecord,
    DnsSecondary,
    DnsZone,
    HealthCheck,
    Port,
    Request,
)
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import Domain
from selfhost.services.base import Service

CONF = "/etc/knot/knot.conf"
ZONES = "/etc/knot/zones"
TTL = 3600
_HOST = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


def _addresses(env: Env, host: str) -> tuple[str, ...]:
    a = env.fleet.hosts[host].addresses
    return tuple(str(x) for x in (a.public or a.lan))


class AuthoritativeDnsService(Service):
    """The model's DNS zones, served by Knot with DNSSEC, and secondaries on fleet hosts."""

    kind: ClassVar[str] = "dns"
    uses: ClassVar[tuple[type[Request], ...]] = (DnsZone, DnsSecondary)

    zones: list[Domain] = Field(
        default_factory=list, description="Zones this host serves as their primary (default: "
        "the server's domain). Their records are the ones the model's services ask for.")
    secondaries: list[str] = Field(
        default_factory=list, description="Hosts of the fleet that serve the zones too, as "
        "secondaries (a friend's host): they transfer each change from this one.")
    listen: list[IPv4Address | IPv6Address] = Field(
        default_factory=list, description="The addresses Knot answers on (default: every "
        "address of the host). Give the public address(es) when a LAN resolver "
        "(services.resolver) runs on the same host: it binds the LAN/VPN addresses, and both "
        "need port 53. Each address must be one of the host's own (a public address that "
        "only the router holds, behind NAT, cannot be bound).")
    dnssec: bool = Field(default=True, description="Sign the zones (Knot's automatic DNSSEC: "
                         "ECDSA P-256 keys, rolled over by Knot). Publish the DS record at "
                         "your registrar: `knotc zone-ksk-submitted` after that.")

    @field_validator("secondaries")
    @classmethod
    def _secondaries(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _HOST.match(name):
                raise ValueError(f"{name!r}: a host name of the fleet")
        if len(set(v)) != len(v):
            raise ValueError("a secondary is listed twice")
        return v

    def zone_names(self, env: Env) -> list[str]:
        return list(self.zones) or [env.server.domain]

    def assertions(self, env: Env) -> list[Problem]:
        out = []
        inside = [z for z in self.zone_names(env)
                  if env.server.fqdn == z or env.server.fqdn.endswith("." + z)]
        if inside and not _addresses(env, env.host):
            out.append(Problem(("addresses",), f"{env.server.fqdn} is a name server of "
                               f"{inside[0]} and inside it: the zone needs its address "
                               "(glue), give addresses.public (or lan for a private domain)"))
        if not _addresses(env, env.host) and self.secondaries:
            out.append(Problem(("addresses",), "this host serves DNS zones to secondaries, "
                               "which need its address: give addresses.public (or lan)"))
        a = env.server.addresses
        own = {*a.public, *a.lan, *a.vpn}
        for i, addr in enumerate(self.listen):
            if addr not in own:
                out.append(Problem(("services", "dns", "listen", i), f"{addr} is not one of "
                                   "this host's addresses in the model (addresses.public, lan "
                                   "or vpn): Knot could not bind it"))
        for i, name in enumerate(self.secondaries):
            found = env.fleet.find(name)
            if found is None:
                out.append(Problem(("services", "dns", "secondaries", i),
                                   f"no host {name!r} in this fleet (hosts: "
                                   f"{', '.join(sorted(env.fleet.hosts))})"))
            elif found == env.host:
                out.append(Problem(("services", "dns", "secondaries", i),
                                   "a host cannot be its own secondary"))
            elif not _addresses(env, found):
                out.append(Problem(("services", "dns", "secondaries", i),
                                   f"{name} has no address in the model (addresses.public "
                                   "or lan): the primary could not NOTIFY it"))
        return out

    def requests(self, env: Env) -> list[Request]:
        found = [h for h in (env.fleet.find(n) for n in self.secondaries) if h and h != env.host]
        secondaries = tuple((h, _addresses(env, h)) for h in found)
        ns = (env.server.fqdn, *(env.fleet.hosts[h].fqdn for h in found))
        out: list[Request] = []
        for i, zone in enumerate(self.zone_names(env)):
            origin = f"{env.path}.zones.{i}" if self.zones else env.path
            out.append(DnsZone(zone, secondaries, self.dnssec, ns, origin=origin))
            out += [DnsSecondary(h, zone, env.host, _addresses(env, env.host), origin=origin)
                    for h in found]
        return out


class KnotServer(Module):
    """Provider of :class:`DnsZone` and :class:`DnsSecondary`: Knot's whole configuration on
    this host (nothing when no zone is asked for)."""

    provides: ClassVar[tuple[type[Request], ...]] = (DnsZone, DnsSecondary)

    @staticmethod
    def listen(env: Env) -> tuple[str, ...]:
        """The addresses Knot binds (``services.dns.listen``; empty: every address). A host
        that is only a secondary has no ``services.dns``: every address."""
        dns = getattr(env.server.services, "dns", None)
        return tuple(str(a) for a in dns.listen) if dns is not None else ()

    def requests(self, env: Env) -> list[Request]:
        if not env.incoming(DnsZone) and not env.incoming(DnsSecondary):
            return []
        bind = self.listen(env)
        probe = (f"[{bind[0]}]" if ":" in bind[0] else bind[0]) if bind else "127.0.0.1"
        return [Port(53, "udp", "internet", comment="DNS", bind=bind),
                Port(53, "tcp", "internet", comment="DNS (transfers, large answers)",
                     bind=bind),
                BackupSource("/var/lib/knot"),  # the DNSSEC keys
                HealthCheck("unit", "knot.service"),
                HealthCheck("tcp", f"{probe}:53")]

    def config(self, zones: list[DnsZone], secondaries: list[DnsSecondary],
               listen: tuple[str, ...] = ()) -> str:
        where = ", ".join(f"{a}@53" for a in listen) or "0.0.0.0@53, ::@53"
        lines = ["# Managed by selfhost: changes here are overwritten on the next deploy.",
                 "server:", '    rundir: "/run/knot"', "    user: knot:knot",
                 "    automatic-acl: on", f"    listen: [ {where} ]", "",
                 "log:", "  - target: syslog", "    any: info", "",
                 "database:", '    storage: "/var/lib/knot"', ""]
        remotes: dict[str, tuple[str, ...]] = {}
        for z in zones:
            for name, addrs in z.secondaries:
                remotes[f"secondary-{name}"] = addrs
        for s in secondaries:
            remotes[f"primary-{s.primary}"] = s.addresses
        if remotes:
            lines.append("remote:")
            for rid, addrs in sorted(remotes.items()):
                lines += [f"  - id: {rid}",
                          f"    address: [ {', '.join(f'{a}@53' for a in addrs)} ]"]
            lines.append("")
        lines += ["template:", "  - id: default", '    storage: "/var/lib/knot"',
                  "    semantic-checks: on", "    zonefile-sync: -1",
                  "    zonefile-load: difference-no-serial", "    journal-content: all",
                  "    serial-policy: unixtime", "", "zone:"]
        for z in sorted(zones, key=lambda z: z.zone):
            lines += [f"  - domain: {z.zone}", f'    file: "{ZONES}/{z.zone}.zone"']
            if z.secondaries:
                ids = ", ".join(f"secondary-{n}" for n, _a in z.secondaries)
                lines.append(f"    notify: [ {ids} ]")
            if z.dnssec:
                lines.append("    dnssec-signing: on")
        for s in sorted(secondaries, key=lambda s: s.zone):
            lines += [f"  - domain: {s.zone}", f"    master: [ primary-{s.primary} ]"]
        return "\n".join(lines) + "\n"

    @staticmethod
    def host_records(z: DnsZone, env: Env) -> list[DnsRecord]:
        """The zone's records whose value is read on this host (``from_host``)."""
        return sorted((r for r in env.incoming(DnsRecord) if r.from_host and (
            r.name.lower().rstrip(".") == z.zone
            or r.name.lower().rstrip(".").endswith("." + z.zone))),
            key=lambda r: (r.name, r.type, r.from_host or ""))

    def assemble(self, z: DnsZone, records: list[DnsRecord]) -> str:
        """Shell that prints the whole zone: the template, then one line per record whose
        value the host has (its command printed something)."""
        parts = [f"cat {ZONES}/{z.zone}.zone.in"]
        for r in records:
            owner = r.name.lower().rstrip(".") + "."
            parts.append(f"v=$( ( {r.from_host} ) 2>/dev/null | tr -s '\\n' ' '); "
                         f"[ -z \"${{v% }}\" ] || printf '%s IN {r.type} %s\\n' "
                         f"'{owner}' \"${{v% }}\"")
        return "; ".join(parts)

    def zone_command(self, z: DnsZone, records: list[DnsRecord]) -> Command:
        live = f"{ZONES}/{z.zone}.zone"
        build = self.assemble(z, records)
        return Command(
            f"dns: zone {z.zone} with the values made on this host "
            f"({', '.join(r.name for r in records)})",
            f"{{ {build}; }} > {live}.new && kzonecheck -o {z.zone} {live}.new && "
            f"chmod 0644 {live}.new && mv {live}.new {live} && "
            f"if knotc zone-status {z.zone} >/dev/null 2>&1; then "
            f"knotc zone-reload {z.zone}; fi",
            unless=f"{{ {build}; }} | cmp -s - {live}",
            after_files=True)

    def zone_file(self, z: DnsZone, env: Env) -> str:
        """The zone's records: the ones requested on this host, the fleet's hosts' own
        addresses when their names are in the zone, the name servers."""
        def rel(name: str) -> str:
            name = name.lower().rstrip(".")
            if name == z.zone:
                return "@"
            return name[: -len(z.zone) - 1] if name.endswith("." + z.zone) else name + "."

        def inside(name: str) -> bool:
            name = name.lower().rstrip(".")
            return name == z.zone or name.endswith("." + z.zone)

        records: list[tuple[str, str, str]] = []
        for r in env.incoming(DnsRecord):
            if inside(r.name) and not r.from_host:
                records.append((r.name.lower().rstrip("."), r.type, r.value))
        for h in env.fleet.hosts.values():
            if inside(h.fqdn):
                for a in h.addresses.public:
                    records.append((h.fqdn, "A" if a.version == 4 else "AAAA", str(a)))
        records += [(z.zone, "NS", n + ".") for n in z.ns]
        out = [f"; Managed by selfhost: the records of zone {z.zone}. Knot numbers and signs it.",
               f"$ORIGIN {z.zone}.", f"$TTL {TTL}",
               f"@ IN SOA {z.ns[0]}. hostmaster.{z.zone}. 1 7200 3600 1209600 3600"]
        order = {"NS": 0, "A": 1, "AAAA": 2, "CNAME": 3, "MX": 4, "TXT": 5, "CAA": 6,
                 "SRV": 7, "TLSA": 8}
        for name, kind, value in sorted(set(records), key=lambda r: (
                rel(r[0]) != "@", rel(r[0]), order.get(r[1], 9), r[2])):
            out.append(f"{rel(name)} IN {kind} {value}")
        return "\n".join(out) + "\n"

    def contribute(self, env: Env) -> Contribution:
        zones = env.incoming(DnsZone)
        secondaries = env.incoming(DnsSecondary)
        c = Contribution()
        if not zones and not secondaries:
            return c
        c.packages += ["knot", "knot-dnsutils", "knot-dnssecutils"]  # kdig; kzonecheck, keymgr
        c.directories.append(ManagedDir(ZONES, "0755"))
        zone_files = []
        for z in zones:
            made_here = self.host_records(z, env)
            path = f"{ZONES}/{z.zone}.zone" + (".in" if made_here else "")
            zone_files.append(path)
            c.files.append(ManagedFile(path, self.zone_file(z, env),
                                       validate=f"kzonecheck -o {z.zone} {{path}}"))
            if made_here:
                c.commands.append(self.zone_command(z, made_here))
        c.files.append(ManagedFile(CONF, self.config(zones, secondaries, self.listen(env)),
                                   mode="0640", group="knot",
                                   validate="knotc -c {path} conf-check"))
        # Restarted, not reloaded: a reload does not apply `listen` (seen: after the package's
        # own start, a reload left Knot bound to nothing). The secondaries answer meanwhile.
        c.units.append(Unit("knot.service", reload=False, reload_on=(CONF, *zone_files)))
        return c
