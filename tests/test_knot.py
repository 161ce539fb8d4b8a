"""Authoritative DNS (Knot): the zone holds what the modules request, the primary and its
fleet secondary are configured from one model, and mistakes are located in the model.
(Debian's kzonecheck and knotc conf-check read these files in the example validator tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from selfhost.compile import Target, compile_fleet
from selfhost.compile.plan import File
from selfhost.config import ConfigError, load_fleet, load_fleet_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dns.yaml"


def knot_files(text: str | None = None) -> dict[str, dict[str, str]]:
    fleet = load_fleet(EXAMPLE) if text is None else load_fleet_text(text, "dns.yaml")
    plans = compile_fleet(fleet, {h: Target(release="trixie") for h in fleet.hosts})
    return {h: {s.file.path: str(s.file.content) for s in p.steps
                if isinstance(s, File) and "/knot" in s.file.path} for h, p in plans.items()}


def test_the_zone_holds_what_the_modules_request() -> None:
    zone = knot_files()["ns1"]["/etc/knot/zones/example.org.zone"]
    assert zone.splitlines()[1:] == [
        "$ORIGIN example.org.",
        "$TTL 3600",
        "@ IN SOA ns1.example.org. hostmaster.example.org. 1 7200 3600 1209600 3600",
        "@ IN NS friend.example.net.",
        "@ IN NS ns1.example.org.",
        '@ IN CAA 0 issue "letsencrypt.org"',
        '@ IN CAA 0 issue "sectigo.com"',
        "ns1 IN A 198.51.100.10",
        "ns1 IN AAAA 2001:db8:10::10",
        "www IN CNAME ns1.example.org.",
    ]


def test_primary_and_secondary_from_one_model() -> None:
    files = knot_files()
    primary = files["ns1"]["/etc/knot/knot.conf"]
    assert "  - id: secondary-friend\n    address: [ 203.0.113.20@53 ]" in primary
    assert "notify: [ secondary-friend ]\n    dnssec-signing: on" in primary
    assert "zonefile-sync: -1" in primary and "zonefile-load: difference-no-serial" in primary
    secondary = files["friend"]["/etc/knot/knot.conf"]
    assert "address: [ 198.51.100.10@53, 2001:db8:10::10@53 ]" in secondary
    assert "  - domain: example.org\n    master: [ primary-ns1 ]" in secondary
    assert list(files["friend"]) == ["/etc/knot/knot.conf"]  # no zone file: transferred


def test_port_53_is_opened_on_both_hosts_only_with_dns() -> None:
    fleet = load_fleet(EXAMPLE)
    plans = compile_fleet(fleet, {h: Target(release="trixie") for h in fleet.hosts})
    for plan in plans.values():
        assert {(p.port, p.proto) for p in plan.ports} >= {(53, "udp"), (53, "tcp")}
    text = EXAMPLE.read_text().replace("      dns:\n        secondaries: [friend]     # the "
                                       "friend's host transfers the zone and serves it too\n",
                                       "")
    assert text != EXAMPLE.read_text()
    assert knot_files(text) == {"ns1": {}, "friend": {}}


@pytest.mark.parametrize(("change", "path", "message"), [
    ("secondaries: [nobody]", "hosts.ns1.services.dns.secondaries.0", "no host 'nobody'"),
    ("secondaries: [ns1]", "hosts.ns1.services.dns.secondaries.0", "its own secondary"),
])
def test_secondary_mistakes_are_located(change: str, path: str, message: str) -> None:
    text = EXAMPLE.read_text().replace("secondaries: [friend]", change)
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(text, "dns.yaml")
    issues = [(i.path, i.message) for i in exc.value.issues]
    assert any(p == path and message in m for p, m in issues), issues


def test_a_secondary_without_address_is_refused() -> None:
    text = EXAMPLE.read_text().replace("    addresses: {public: [203.0.113.20]}\n", "")
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(text, "dns.yaml")
    assert any("friend has no address" in i.message for i in exc.value.issues)


def test_a_name_server_inside_its_zone_needs_an_address() -> None:
    """kzonecheck refuses a zone whose in-zone NS has no address ("missing glue record",
    seen in a rehearsal): the model says so first, at its place."""
    text = EXAMPLE.read_text().replace(
        '    addresses: {public: [198.51.100.10, "2001:db8:10::10"]}\n', "")
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(text, "dns.yaml")
    assert any(i.path == "hosts.ns1.addresses" and "needs its address" in i.message
               for i in exc.value.issues), exc.value.issues


BOTH = """hostname: ns
domain: example.org
addresses: {public: [203.0.113.5], lan: [192.168.1.10]}
admins:
  - name: alice
    ssh_keys: [ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P a@b]
services:
  resolver: {}
  dns: {LISTEN}
"""


def test_a_lan_resolver_and_the_authoritative_server_share_port_53_on_other_addresses() -> None:
    from selfhost.compile import compile_server
    from selfhost.config import load_server_text

    # Knot on every address: the resolver's LAN address is taken. Located, with the way out.
    with pytest.raises(ConfigError) as exc:
        load_server_text(BOTH.replace("{LISTEN}", "{}"), "both.yaml")
    msgs = [i.message for i in exc.value.issues]
    assert any(m.startswith("port 53/udp is requested by both services.resolver and "
                            "dns-server") and "bind them to different addresses" in m
               for m in msgs), msgs
    # Knot on the public address, Unbound on the LAN one: both run.
    server = load_server_text(BOTH.replace("{LISTEN}", "{listen: [203.0.113.5]}"), "both.yaml")
    plan = compile_server(server, Target(release="trixie"))
    files = {s.file.path: str(s.file.content) for s in plan.steps if isinstance(s, File)}
    assert "    listen: [ 203.0.113.5@53 ]" in files["/etc/knot/knot.conf"]
    assert "    interface: 192.168.1.10" in files["/etc/unbound/unbound.conf.d/selfhost.conf"]
    ports = {(p.port, p.proto, p.zone, p.bind) for p in plan.ports if p.port == 53}
    assert ports == {(53, proto, zone, bind) for proto in ("udp", "tcp") for zone, bind in
                     (("internet", ("203.0.113.5",)), ("lan", ("192.168.1.10",)))}
    assert ("tcp", "203.0.113.5:53") in {(h.kind, h.target) for h in plan.health}
    # An address the host does not have cannot be bound.
    with pytest.raises(ConfigError) as exc:
        load_server_text(BOTH.replace("{LISTEN}", "{listen: [203.0.113.6]}"), "both.yaml")
    assert [(i.path, i.line) for i in exc.value.issues] == [("services.dns.listen.0", 9)]


def test_ports_on_other_addresses_do_not_overlap() -> None:
    from selfhost.compose.requests import Port

    a, b = Port(53, bind=("192.168.1.10",)), Port(53, bind=("203.0.113.5",))
    assert not a.overlaps(b) and a.overlaps(Port(53)) and Port(53).overlaps(b)
    assert a.overlaps(Port(53, bind=("192.168.1.10", "10.8.0.1")))
