"""``selfhost dns``: the records modules request, grouped by zone, printed as zone-file lines
that named-checkzone (Debian's, in the validators container) accepts; values made on a host
are read there or printed commented out, never published as placeholders."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from validators import Validators

from selfhost.cli import main
from selfhost.compose.requests import DnsRecord, txt_data
from selfhost.config import load_fleet_text
from selfhost.dns import fleet_records, read_values, render, zones

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
       "alice@laptop")
FLEET = f"""
defaults:
  domain: example.org
  admins: [{{name: alice, ssh_keys: ["{KEY}"]}}]
hosts:
  web:
    hostname: web
    addresses: {{public: [203.0.113.10, "2001:db8::10"], lan: [192.168.1.10]}}
    services:
      web:
        sites: [{{host: www}}, {{host: "@"}}]
  friend:
    hostname: friend
    domain: example.net
    addresses: {{public: [198.51.100.7]}}
  home:
    hostname: nas
    domain: home.arpa
    addresses: {{lan: [192.168.1.20]}}
    services:
      web:
        sites: [{{host: www}}]
"""

EXPECTED = """\
; selfhost dns fleet.yaml: the DNS records this model asks to publish, by zone.
; Paste each zone's lines into that zone at your DNS provider.

; ---- zone example.net
$ORIGIN example.net.
friend 3600 IN A     198.51.100.7

; ---- zone example.org
$ORIGIN example.org.
@   3600 IN A     203.0.113.10
@   3600 IN AAAA  2001:db8::10
@   3600 IN CAA   0 issue "letsencrypt.org" ; Caddy's ACME CAs
@   3600 IN CAA   0 issue "sectigo.com"
web 3600 IN A     203.0.113.10
web 3600 IN AAAA  2001:db8::10
www 3600 IN CNAME web.example.org.

; ---- zone home.arpa (a private name: for your LAN resolver, not a public DNS provider)
$ORIGIN home.arpa.
nas 3600 IN A     192.168.1.20
www 3600 IN CNAME nas.home.arpa.
"""


@pytest.fixture
def fleet() -> Any:
    return load_fleet_text(FLEET, "fleet.yaml")


def test_records_of_every_host_grouped_by_zone(fleet: Any) -> None:
    assert render(fleet, "fleet.yaml", fleet_records(fleet)) == EXPECTED


def test_the_zones_load_in_named_checkzone(fleet: Any, validators: Validators) -> None:
    text = render(fleet, "fleet.yaml", fleet_records(fleet), zone_file=True)
    sections = text.split("\n; ---- zone ")[1:]
    assert len(sections) == 3
    for section in sections:
        origin = section.split()[0]
        res = validators.check("trixie", f"/var/tmp/{origin}.zone", "; " + section,
                               f"named-checkzone -k fail {origin} {{path}}")
        out = (res.stdout + res.stderr).decode()
        assert res.returncode == 0 and out.rstrip().endswith("OK"), out
    # And it can fail: a CNAME beside other data at one name is refused.
    bad = sections[1] + "web 3600 IN CNAME www.example.org.\n"
    res = validators.check("trixie", "/var/tmp/bad.zone", "; " + bad,
                           "named-checkzone -k fail example.org {path}")
    assert res.returncode != 0 and "CNAME and other data" in (res.stdout + res.stderr).decode()


def test_a_value_made_on_the_host_is_read_there_or_commented_out(fleet: Any,
                                                                  tmp_path: Path) -> None:
    dkim = DnsRecord("mail._domainkey.example.org", "TXT", txt_data("v=DKIM1; k=rsa; p=<key>"),
                     note="the DKIM key is generated on the server",
                     from_host=f"cat {tmp_path}/dkim.txt")
    records = [*fleet_records(fleet), ("web", dkim)]
    text = render(fleet, "fleet.yaml", records)
    assert ('; mail._domainkey 3600 IN TXT   "v=DKIM1; k=rsa; p=<key>"\n'
            ";   ^ placeholder, not published: the DKIM key is generated on the server (read "
            "it from web with --podman or --ssh)") in text

    (tmp_path / "dkim.txt").write_text('"v=DKIM1; k=rsa; "\n"p=MIIBIjAN"\n')

    def shell(script: str) -> list[str]:  # the host, as selfhost.audit.runner runs it
        out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                             check=True)
        return out.stdout.splitlines()

    values = read_values(records, {"web": shell})
    assert values == {len(records) - 1: '"v=DKIM1; k=rsa; " "p=MIIBIjAN"'}
    text = render(fleet, "fleet.yaml", records, values)
    assert 'mail._domainkey 3600 IN TXT   "v=DKIM1; k=rsa; " "p=MIIBIjAN"\n' in text
    assert "placeholder" not in text
    # Nothing read (an empty file on the host): still a placeholder.
    (tmp_path / "dkim.txt").write_text("")
    assert read_values(records, {"web": shell}) == {}


def test_zone_of_a_record_is_the_longest_known_zone(fleet: Any) -> None:
    mx = DnsRecord("lists.example.org", "MX", "10 web.example.org.")
    spf = DnsRecord("lists.example.org", "TXT", txt_data("v=spf1 mx -all"))
    found = {z.origin: z for z in zones(fleet, [*fleet_records(fleet), ("web", mx),
                                               ("web", spf)])}
    assert [r.type for _h, r in found["lists.example.org"].records] == ["MX", "TXT"]
    assert "lists.example.org" not in {r.name for _h, r in found["example.org"].records}


def test_txt_data_splits_long_strings_and_escapes() -> None:
    assert txt_data('a "b" \\') == '"a \\"b\\" \\\\"'
    parts = txt_data("x" * 600).split(" ")
    assert [len(p) for p in parts] == [257, 257, 92]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(FLEET)
    assert main(["dns", str(f)]) == 0
    out = capsys.readouterr().out
    assert out == EXPECTED.replace("fleet.yaml", str(f))
    assert main(["dns", str(f), "--podman", "nohost=x"]) == 2
