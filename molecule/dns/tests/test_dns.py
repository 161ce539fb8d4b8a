"""The dns scenario: Knot serves each primary's zone, signed, and its friend's secondary
serves the same zone (NOTIFY + transfer), checked with kdig (Debian's knot-dnsutils) from the
containers over their internal test network."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parents[1]


def platform(name: str) -> dict[str, Any]:
    platforms = yaml.safe_load((HERE / "molecule.yml").read_text())["platforms"]
    return dict(next(p for p in platforms if p["name"] == name))


@pytest.fixture(scope="module")
def pair(host: Any) -> dict[str, str]:
    """The primary's and the secondary's containers and addresses, and the zone."""
    primary = str(host.backend.name)
    secondary = primary.replace("-ns1-", "-friend-")
    fleet = yaml.safe_load((HERE / "fleet.yaml").read_text())
    zone = fleet["hosts"][platform(primary)["host"]]["domain"]
    return {"primary": primary, "secondary": secondary, "zone": zone,
            "primary_ip": platform(primary)["ip"], "secondary_ip": platform(secondary)["ip"]}


def kdig(container: str, *args: str) -> str:
    res = subprocess.run(["podman", "exec", container, "kdig", "+time=3", "+retry=1", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def serial(container: str, server: str, zone: str) -> int:
    out = kdig(container, f"@{server}", zone, "SOA", "+short")
    return int(out.split()[2]) if out.split() else -1


def wait_same_serial(pair: dict[str, str], at_least: int = 0) -> int:
    deadline = time.monotonic() + 60
    while True:
        a = serial(pair["primary"], pair["primary_ip"], pair["zone"])
        b = serial(pair["primary"], pair["secondary_ip"], pair["zone"])
        if a == b and a > at_least:
            return a
        if time.monotonic() > deadline:
            raise AssertionError(f"serials differ: primary {a}, secondary {b}")
        time.sleep(1)


def test_both_servers_answer_the_zone_signed(pair: dict[str, str]) -> None:
    wait_same_serial(pair)
    for server in (pair["primary_ip"], pair["secondary_ip"]):
        out = kdig(pair["primary"], f"@{server}", "+dnssec", f"ns1.{pair['zone']}", "A")
        assert "status: NOERROR" in out and "Flags: qr aa" in out, out
        assert f"ns1.{pair['zone']}." in out and pair["primary_ip"] in out, out
        assert "RRSIG" in out, out  # signed (Knot's automatic DNSSEC)
        keys = kdig(pair["primary"], f"@{server}", "+dnssec", pair["zone"], "DNSKEY")
        assert keys.count("DNSKEY\t257") + keys.count("DNSKEY 257") >= 1, keys  # a KSK
    ns = kdig(pair["primary"], f"@{pair['secondary_ip']}", pair["zone"], "NS", "+short")
    assert sorted(ns.split()) == sorted([f"ns1.{pair['zone']}.", "friend." + {
        "example.org": "example.net.", "example.com": "example.info."}[pair["zone"]]])


def test_transfers_go_to_the_secondary_only(pair: dict[str, str]) -> None:
    # From the secondary (allowed: it is the primary's secondary) ...
    ok = kdig(pair["secondary"], f"@{pair['primary_ip']}", pair["zone"], "AXFR")
    assert "SOA" in ok and "RRSIG" in ok and "REFUSED" not in ok, ok
    # ... and from anything else (here the primary itself, from its own address): refused.
    res = subprocess.run(["podman", "exec", pair["primary"], "kdig", "+time=3",
                          f"@{pair['primary_ip']}", pair["zone"], "AXFR"],
                         capture_output=True, text=True, timeout=60)
    # Knot answers a transfer it does not allow with NOTAUTH (or REFUSED).
    assert "NOTAUTH" in res.stdout + res.stderr or "REFUSED" in res.stdout + res.stderr, \
        res.stdout + res.stderr
    assert " SOA " not in res.stdout.replace("\t", " ")


def test_the_lan_resolver_shares_port_53_on_its_own_address(pair: dict[str, str]) -> None:
    """Knot binds the public address only (services.dns.listen), Unbound the LAN one: both
    answer on port 53 of the same host, each its own view of the server's name."""
    lan_ip = platform(pair["primary"])["lan_ip"]
    listening = subprocess.run(["podman", "exec", pair["primary"], "ss", "-H", "-lnu",
                                "sport = :53"], capture_output=True, text=True, timeout=60)
    local = {line.split()[3] for line in listening.stdout.splitlines()}
    assert local == {f"{pair['primary_ip']}:53", f"{lan_ip}:53"}, listening.stdout  # no wildcard
    # From the friend's host on the LAN: the resolver answers with the server's LAN address
    # (split horizon), recursion available; Knot answers with the public one, authoritative.
    lan = kdig(pair["secondary"], f"@{lan_ip}", f"ns1.{pair['zone']}", "A")
    assert "status: NOERROR" in lan and lan_ip in lan and "ra" in lan.split("Flags:")[1]
    auth = kdig(pair["secondary"], f"@{pair['primary_ip']}", f"ns1.{pair['zone']}", "A",
                "+short")
    assert auth.split() == [pair["primary_ip"]]


def test_a_change_of_the_model_reaches_the_secondary(pair: dict[str, str],
                                                     tmp_path: Path) -> None:
    """A second public address for the primary (a new A record): after the deploy, the
    secondary serves it, with the primary's new serial."""
    before = wait_same_serial(pair)
    extra = pair["primary_ip"].rsplit(".", 1)[0] + ".20"
    fleet = (HERE / "fleet.yaml").read_text().replace(
        f"addresses: {{public: [{pair['primary_ip']}],",
        f"addresses: {{public: [{pair['primary_ip']}, {extra}],")
    assert extra in fleet
    changed = tmp_path / "fleet.yaml"
    changed.write_text(fleet)
    res = subprocess.run([str(REPO / ".venv" / "bin" / "pyinfra"), "-y",
                          "molecule/dns/inventory.py", "deploys/home_server.py"],
                         capture_output=True, text=True, cwd=REPO, timeout=900,
                         env={**os.environ, "SELFHOST_DNS_FLEET": str(changed)})
    assert res.returncode == 0, res.stderr[-3000:]
    after = wait_same_serial(pair, at_least=before)
    assert after > before
    answer = kdig(pair["primary"], f"@{pair['secondary_ip']}", f"ns1.{pair['zone']}", "A",
                  "+short")
    assert sorted(answer.split()) == sorted([pair["primary_ip"], extra])
