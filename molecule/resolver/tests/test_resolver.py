"""The LAN resolver with a real DNS client.

`dig` runs in the client container on the scenario's internal networks (10.212.121.10, in the
LAN; 10.212.122.10, in the network standing for the VPN; 10.212.121.200, in neither), which
also runs NSD with two zones signed in advance
(zones/make-zones). Nothing here can reach the internet, so DNSSEC is proven on those zones:
`signed.test`'s trust anchor is in the model (AD flag expected), `bogus.test` was changed
after signing (SERVFAIL expected, while the same query with checking disabled gets the data:
the failure is the validator's, not an unreachable server).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

CLIENT = "u12-resolver-client"
OUTSIDE = "10.212.121.200"
PLATFORMS = yaml.safe_load((Path(__file__).parents[1] / "molecule.yml").read_text())["platforms"]


def dig(*args: str, source: str | None = None, container: str = CLIENT) -> str:
    """``dig`` in ``container``: the whole answer (header, flags, sections)."""
    argv = ["podman", "exec", container, "dig", "+time=2", "+tries=1", *args]
    if source:
        argv.insert(4, f"-b{source}")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return res.stdout + res.stderr


def status(answer: str) -> str:
    for line in answer.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "no answer"


def flags(answer: str) -> set[str]:
    for line in answer.splitlines():
        if line.startswith(";; flags:"):
            return set(line.split(":")[1].split(";")[0].split())
    return set()


@pytest.fixture(scope="module")
def server(host: Any) -> dict[str, str]:
    """This server's platform: its name in the model and its LAN address."""
    name = str(host.backend.name)
    p = next(p for p in PLATFORMS if p["name"] == name)
    return {"name": name, "host": p["host"], "address": p["address"],
            "vpn_address": p["vpn_address"]}


def test_unbound_runs_on_the_lan_address_only(host: Any, server: dict[str, str]) -> None:
    unbound = host.service("unbound")
    assert unbound.is_running and unbound.is_enabled
    sockets = host.check_output("ss -Hlnup 'sport = :53'; ss -Hlntp 'sport = :53'")
    local = {line.split()[3] for line in sockets.splitlines() if line.strip()}
    # No wildcard, no loopback.
    assert local == {f"{server['address']}:53", f"{server['vpn_address']}:53"}, sockets


def test_the_servers_own_resolver_is_left_alone(host: Any, server: dict[str, str]) -> None:
    # Debian's resolvconf hook is off: /etc/resolv.conf does not point at Unbound.
    resolv = host.file("/etc/resolv.conf").content_string
    assert server["address"] not in resolv and server["vpn_address"] not in resolv
    assert "127.0.0.1" not in resolv
    assert "RESOLVCONF=false" in host.file("/etc/default/unbound").content_string


def test_the_config_passes_unbound_checkconf(host: Any) -> None:
    assert host.run("unbound-checkconf").rc == 0


def test_the_root_trust_anchor_is_debians(host: Any) -> None:
    # dns-root-data's anchor, copied by Debian's unit for auto-trust-anchor-file (the root's
    # KSK-2017, key tag 20326); the internet is out of reach here, so no root-chained answer
    # can be checked.
    assert "20326" in host.file("/usr/share/dns/root.key").content_string
    assert "20326" in host.file("/var/lib/unbound/root.key").content_string
    assert host.check_output("unbound-checkconf -o auto-trust-anchor-file") == \
        "/var/lib/unbound/root.key"


def test_split_horizon_names_get_the_lan_address(server: dict[str, str]) -> None:
    for name in ("www.home.arpa", f"{server['host']}.home.arpa"):
        answer = dig(f"@{server['address']}", name, "A")
        assert status(answer) == "NOERROR", answer
        short = dig("+short", f"@{server['address']}", name, "A").split()
        assert short == [server["address"]], answer
    assert dig("+short", f"@{server['address']}", "printer.home.arpa").split() == \
        ["10.212.121.20"]
    # No other address type that would take a client around home.
    aaaa = dig(f"@{server['address']}", "www.home.arpa", "AAAA")
    assert status(aaaa) == "NOERROR" and "ANSWER: 0" in aaaa, aaaa
    ptr = dig("+short", f"@{server['address']}", "-x", server["address"]).split()
    assert ptr == [f"{server['host']}.home.arpa."]


def test_vpn_clients_get_the_vpn_address(server: dict[str, str]) -> None:
    for name in ("www.home.arpa", f"{server['host']}.home.arpa"):
        short = dig("+short", f"@{server['vpn_address']}", name, source="10.212.122.10")
        assert short.split() == [server["vpn_address"]], (name, short)


def test_dnssec_validated_answer_has_the_ad_flag(server: dict[str, str]) -> None:
    answer = dig(f"@{server['address']}", "www.signed.test", "A")
    assert status(answer) == "NOERROR" and "ad" in flags(answer), answer
    assert "192.0.2.80" in answer


def test_a_zone_with_a_broken_signature_is_refused(server: dict[str, str]) -> None:
    answer = dig(f"@{server['address']}", "www.bogus.test", "A")
    assert status(answer) == "SERVFAIL", answer
    assert "192.0.2.66" not in answer
    # The reason, in the answer (Extended DNS Error 6): the signature, not a missing chain
    # of trust (which would be EDE 9, DNSKEY Missing, without the zone's trust anchor).
    assert "EDE: 6 (DNSSEC Bogus)" in answer and "signature crypto failed" in answer, answer
    # With checking disabled the data comes through: the server was reached, the validator
    # said no.
    unchecked = dig("+cd", f"@{server['address']}", "www.bogus.test", "A")
    assert status(unchecked) == "NOERROR" and "192.0.2.66" in unchecked, unchecked


def test_blocklisted_names_get_nxdomain(server: dict[str, str]) -> None:
    for name in ("ads.example.com", "pixel.ads.example.com", "tracker.example.net"):
        answer = dig(f"@{server['address']}", name, "A")
        assert status(answer) == "NXDOMAIN", (name, answer)
    # Not what any other name gets: the internet is out of reach (the scenario drops the
    # server's DNS packets to anything outside the test networks), so it fails to resolve.
    other = dig(f"@{server['address']}", "www.example.com", "A")
    assert status(other) in ("SERVFAIL", "no answer"), other


def test_a_query_from_outside_the_lan_gets_nothing(server: dict[str, str]) -> None:
    # From the client's second address (outside hardening.firewall.lan): dropped.
    answer = dig(f"@{server['address']}", "www.home.arpa", source=OUTSIDE)
    assert status(answer) == "no answer" and "timed out" in answer, answer
    # The same client from its LAN address is answered (the drop is about the source).
    inside = dig(f"@{server['address']}", "www.home.arpa", source="10.212.121.10")
    assert status(inside) == "NOERROR", inside


def test_unbound_refuses_a_source_outside_its_access_control(host: Any,
                                                           server: dict[str, str]) -> None:
    # On the server, from 127.0.0.1 to its LAN address: past the firewall (loopback is
    # accepted there), so Unbound's own access-control answers. The server has no dig: a
    # DNS query by hand, printing the answer's RCODE (5: REFUSED).
    script = (
        "import socket, struct, sys\n"
        "q = struct.pack('>HHHHHH', 0x5e1f, 0x0100, 1, 0, 0, 0)\n"
        "q += b''.join(bytes([len(p)]) + p.encode() for p in 'www.home.arpa'.split('.'))\n"
        "q += b'\\0' + struct.pack('>HH', 1, 1)\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('127.0.0.1', 0)); s.settimeout(3); s.sendto(q, (sys.argv[1], 53))\n"
        "print(s.recv(512)[3] & 15)\n")
    rcode = host.check_output(f"python3 -c {shlex.quote(script)} {server['address']}")
    assert rcode == "5"
    # The same query from the server's own LAN address is answered (RCODE 0).
    own = script.replace("'127.0.0.1'", repr(server["address"]))
    assert host.check_output(f"python3 -c {shlex.quote(own)} {server['address']}") == "0"
