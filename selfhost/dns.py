"""``selfhost dns``: the DNS records a model asks to publish, as zone-file lines to paste into
a DNS provider (or to serve with an authoritative DNS module).

Nobody lists a record by hand: each module requests the records of what it runs
(:class:`~selfhost.compose.requests.DnsRecord`: the host's A/AAAA, the web server's names and
CAA, mail's MX, SPF, DKIM and DMARC...), and this module only groups and prints them. A record
whose value is made on the server (a DKIM public key) is read there when the host is reachable
(``--podman``/``--ssh``); otherwise it is printed commented out, with a note, so that a paste
never publishes a placeholder.

Zones: the servers' domains and the names that receive mail (MX owners) are zones; a record
belongs to the longest zone it is in (or to its parent name when in none). Names under a
private suffix (``home.arpa``, ``.lan``, ``.internal``...) are shown apart: they are for a LAN
resolver, never for a public provider.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from selfhost.compose.requests import DnsRecord
from selfhost.models.fleet import Fleet

TTL = 3600
Runner = Callable[[str], list[str]]
"""Runs a shell script on a host (as root) and returns its output lines (selfhost.audit)."""


@dataclass
class Zone:
    origin: str
    records: list[tuple[str, DnsRecord]] = field(default_factory=list)
    """(host, record), in a stable order."""

    @property
    def private(self) -> bool:
        from selfhost.services.web import is_public_domain

        return not is_public_domain(self.origin)


def fleet_records(fleet: Fleet) -> list[tuple[str, DnsRecord]]:
    """Every host's routed DNS record requests, without duplicates (two hosts asking the same
    record, e.g. CAA at a shared domain, publish it once)."""
    from selfhost.compile import prepare

    routed, _warnings = prepare(fleet)
    seen: set[tuple[str, str, str]] = set()
    out: list[tuple[str, DnsRecord]] = []
    for host in fleet.hosts:
        for r in routed[host].requests.get(DnsRecord, []):
            assert isinstance(r, DnsRecord)
            k = (r.name.lower().rstrip("."), r.type, r.value)
            if k not in seen:
                seen.add(k)
                out.append((host, r))
    return out


def _within(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def zones(fleet: Fleet, records: Iterable[tuple[str, DnsRecord]]) -> list[Zone]:
    records = list(records)
    origins = {s.domain.lower() for s in fleet.hosts.values()}
    origins |= {r.name.lower().rstrip(".") for _h, r in records if r.type == "MX"}
    by_origin: dict[str, Zone] = {}
    for host, r in records:
        name = r.name.lower().rstrip(".")
        inside = [o for o in origins if _within(name, o)]
        origin = max(inside, key=len) if inside else name.partition(".")[2] or name
        by_origin.setdefault(origin, Zone(origin)).records.append((host, r))
    order = {"A": 0, "AAAA": 1, "CNAME": 2, "MX": 3, "TXT": 4, "CAA": 5, "SRV": 6, "TLSA": 7}
    for z in by_origin.values():
        z.records.sort(key=lambda hr: (_relative(hr[1].name, z.origin) != "@",
                                       _relative(hr[1].name, z.origin), order[hr[1].type]))
    return sorted(by_origin.values(), key=lambda z: (z.private, z.origin))


def _relative(name: str, origin: str) -> str:
    name = name.lower().rstrip(".")
    return "@" if name == origin else name[: -len(origin) - 1] if _within(name, origin) else \
        name + "."


def read_values(records: Iterable[tuple[str, DnsRecord]],
                runners: dict[str, Runner]) -> dict[int, str]:
    """The values made on the hosts (``from_host``), read in one round trip per host: record
    index in ``records`` -> value (hosts without a runner, or empty output, are left out)."""
    out: dict[int, str] = {}
    by_host: dict[str, list[tuple[int, str]]] = {}
    for i, (host, r) in enumerate(records):
        if r.from_host and host in runners:
            by_host.setdefault(host, []).append((i, r.from_host))
    for host, items in by_host.items():
        script = "".join(f"printf 'V\\t{i}\\t'; ( {cmd} ) 2>/dev/null | tr -s '\\n' ' '; echo\n"
                         for i, cmd in items)
        for line in runners[host](script):
            tag, _, rest = line.partition("\t")
            index, _, value = rest.partition("\t")
            if tag == "V" and index.isdigit() and value.strip():
                out[int(index)] = value.strip()
    return out


def render(fleet: Fleet, source: str, records: list[tuple[str, DnsRecord]],
           values: dict[int, str] | None = None, zone_file: bool = False) -> str:
    """Zone-file text, one section per zone. With ``zone_file``, each section is a whole zone
    (``$TTL``, a placeholder SOA and NS) that ``named-checkzone`` or a DNS server can load."""
    values = values or {}
    index = {id(r): i for i, (_h, r) in enumerate(records)}
    lines = [f"; selfhost dns {source}: the DNS records this model asks to publish, by zone.",
             "; Paste each zone's lines into that zone at your DNS provider."]
    for z in zones(fleet, records):
        lines += ["", f"; ---- zone {z.origin}" + (
            " (a private name: for your LAN resolver, not a public DNS provider)"
            if z.private else "")]
        if zone_file:
            ns = next((s.fqdn for s in fleet.hosts.values()
                       if _within(s.fqdn, z.origin) and s.addresses.public), None)
            lines += [f"$ORIGIN {z.origin}.", f"$TTL {TTL}",
                      f"@ IN SOA {ns or 'ns.invalid'}. hostmaster.{z.origin}. "
                      "1 7200 3600 1209600 3600",
                      f"@ IN NS {ns or 'ns.invalid'}."]
        else:
            lines.append(f"$ORIGIN {z.origin}.")
        width = max(len(_relative(r.name, z.origin)) for _h, r in z.records)
        for host, r in z.records:
            i = index[id(r)]
            value = values.get(i, r.value)
            line = (f"{_relative(r.name, z.origin):<{width}} {TTL} IN {r.type:<5} {value}")
            if r.from_host and i not in values:
                lines.append(f"; {line}")
                lines.append(f";   ^ placeholder, not published: {r.note or 'made on the host'}"
                             f" (read it from {host} with --podman or --ssh)")
            else:
                lines.append(line + (f" ; {r.note}" if r.note and not r.from_host else ""))
    return "\n".join(lines) + "\n"
