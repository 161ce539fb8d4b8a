"""Mail's DNS records and what serves them (issue 11): MTA-STS (policy host served by the web
module, id that follows the policy), TLS-RPT, the SRV records of RFC 6186/8314 for mail
programs, DKIM keys read on the host (by `selfhost dns` and by Knot for the published zone),
and the smarthost relay (SASL password only in a root-only table, never in the plan)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from validators import Validators

from selfhost.cli import main
from selfhost.compile import Target, compile_fleet
from selfhost.compile.plan import File, Packages, Run
from selfhost.compose.requests import DnsRecord, VirtualHost
from selfhost.compose.route import route_host
from selfhost.config import ConfigError, load_fleet_text
from selfhost.dns import fleet_records, read_values, render
from selfhost.services import knot, mail

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
       "alice@laptop")
MODEL = f"""
defaults:
  timezone: Europe/Paris
  admins: [{{name: alice, ssh_keys: ["{KEY}"]}}]
hosts:
  mx:
    hostname: mx
    domain: example.org
    addresses: {{public: [198.51.100.10]}}
    services:
      dns: {{}}
      mail:
        domains: [{{name: example.org}}]
        mailboxes: [{{address: alice@example.org, password: {{env: MAIL_ALICE_PASSWORD}}}}]
        aliases: [{{address: postmaster@example.org, to: [alice@example.org]}}]
        backup_mx: {{host: friend}}
        relay:
          host: smtp.provider.net
          username: mx@provider.net
          password: {{env: MAIL_RELAY_PASSWORD}}
          spf_include: _spf.provider.net
  friend:
    hostname: friend
    domain: example.net
    addresses: {{public: [203.0.113.20]}}
"""

ZONE = """\
; ---- zone example.org
$ORIGIN example.org.
@                 3600 IN MX    10 mx.example.org.
@                 3600 IN MX    20 friend.example.net.
@                 3600 IN TXT   "v=spf1 mx include:_spf.provider.net -all"
@                 3600 IN CAA   0 issue "letsencrypt.org" ; Caddy's ACME CAs
@                 3600 IN CAA   0 issue "sectigo.com"
_dmarc            3600 IN TXT   "v=DMARC1; p=quarantine; adkim=s; aspf=s"
_imap._tcp        3600 IN SRV   0 0 0 .
_imaps._tcp       3600 IN SRV   0 1 993 mx.example.org.
_mta-sts          3600 IN TXT   "v=STSv1; id={sts_id}"
_pop3._tcp        3600 IN SRV   0 0 0 .
_pop3s._tcp       3600 IN SRV   0 0 0 .
_smtp._tls        3600 IN TXT   "v=TLSRPTv1; rua=mailto:postmaster@example.org"
_submission._tcp  3600 IN SRV   0 1 587 mx.example.org.
_submissions._tcp 3600 IN SRV   0 1 465 mx.example.org.
; mail._domainkey   3600 IN TXT   "v=DKIM1; k=rsa; p=<public key>"
;   ^ placeholder, not published: the DKIM key is generated on the server \
(/etc/opendkim/keys/example.org/mail.txt) (read it from mx with --podman or --ssh)
mta-sts           3600 IN CNAME mx.example.org.
mx                3600 IN A     198.51.100.10
"""

POLICY = ("version: STSv1\r\nmode: testing\r\nmx: mx.example.org\r\nmx: friend.example.net\r\n"
          "max_age: 86400\r\n")

GENKEY_TXT = """\
mail._domainkey\tIN\tTXT\t( "v=DKIM1; h=sha256; k=rsa; "
\t  "p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx"
\t  "QIDAQAB" )  ; ----- DKIM key mail for example.org
"""


def data(**mail_changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = yaml.safe_load(MODEL)
    d["hosts"]["mx"]["services"]["mail"].update(mail_changes)
    return d


def fleet_of(d: dict[str, Any] | None = None) -> Any:
    return load_fleet_text(MODEL if d is None else yaml.safe_dump(d), "mail.yaml")


def plans(d: dict[str, Any] | None = None) -> Any:
    fleet = fleet_of(d)
    return compile_fleet(fleet, {h: Target(release="trixie") for h in fleet.hosts})


def test_selfhost_dns_prints_mta_sts_tls_rpt_and_the_srv_records() -> None:
    fleet = fleet_of()
    out = render(fleet, "mail.yaml", fleet_records(fleet))
    sts_id = re.search(r"id=([0-9a-f]+)", out)
    assert sts_id is not None
    assert ZONE.format(sts_id=sts_id.group(1)) in out, out


def test_the_mta_sts_policy_is_served_by_the_web_module_and_its_id_follows_it() -> None:
    files = plans()["mx"].files()
    path = f"{mail.MTA_STS_ROOT}/example.org/.well-known/mta-sts.txt"
    assert files[path] == POLICY
    fleet = fleet_of()
    routed = route_host(fleet, "mx", fleet.hosts["mx"].modules())
    [vhost] = [v for v in routed.requests[VirtualHost] if isinstance(v, VirtualHost)
               and v.host == "mta-sts.example.org"]
    assert vhost.root == f"{mail.MTA_STS_ROOT}/example.org"
    caddy = files["/etc/caddy/Caddyfile"]
    assert "mta-sts.example.org {" in caddy and f"root * {mail.MTA_STS_ROOT}/example.org" \
        in caddy, caddy

    def sts_id(d: dict[str, Any] | None) -> str:
        f = fleet_of(d)
        [r] = [r for _h, r in fleet_records(f) if r.name == "_mta-sts.example.org"]
        return r.value

    enforce = data(domains=[{"name": "example.org", "mta_sts": "enforce"}])
    no_backup = data(backup_mx=None)
    ids = {sts_id(None), sts_id(enforce), sts_id(no_backup)}
    assert len(ids) == 3, ids  # a new mode or MX list is a new id
    assert "mode: enforce\r\n" in plans(enforce)["mx"].files()[path]
    assert "max_age: 604800\r\n" in plans(enforce)["mx"].files()[path]
    off = plans(data(domains=[{"name": "example.org", "mta_sts": "off"}]))["mx"].files()
    assert path not in off and "mta-sts.example.org" not in off["/etc/caddy/Caddyfile"]


def test_mta_sts_on_a_private_domain_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError) as exc:
        fleet_of(data(domains=[{"name": "home.arpa", "mta_sts": "testing"}],
                      mailboxes=[], aliases=[]))
    issues = [(i.path, i.message) for i in exc.value.issues]
    assert any(p == "hosts.mx.services.mail.domains.0.mta_sts" and "private name" in m
               for p, m in issues), issues


def test_the_zone_passes_named_checkzone(validators: Validators) -> None:
    fleet = fleet_of()
    text = render(fleet, "mail.yaml", fleet_records(fleet), zone_file=True)
    [section] = [s for s in text.split("\n; ---- zone ")[1:] if s.startswith("example.org")]
    res = validators.check("trixie", "/var/tmp/example.org.zone", "; " + section,
                           "named-checkzone -k fail -S fail example.org {path}")
    out = (res.stdout + res.stderr).decode()
    assert res.returncode == 0 and out.rstrip().endswith("OK"), out
    # It can fail: an SRV record whose target is an alias (CNAME) is refused.
    bad = section + "_imaps._tcp 3600 IN SRV 0 1 993 mta-sts.example.org.\n"
    res = validators.check("trixie", "/var/tmp/bad.zone", "; " + bad,
                           "named-checkzone -k fail -S fail example.org {path}")
    assert res.returncode != 0, (res.stdout + res.stderr).decode()


def shell(script: str) -> list[str]:
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_selfhost_dns_reads_the_dkim_key_from_the_host(tmp_path: Path) -> None:
    """The mail module's DKIM record reads opendkim-genkey's file on the host: the command it
    gives, run on a copy of such a file, yields the record's strings."""
    fleet = fleet_of()
    records = fleet_records(fleet)
    [(i, dkim)] = [(i, r) for i, (_h, r) in enumerate(records)
                   if r.name == "mail._domainkey.example.org"]
    assert dkim.from_host is not None
    (tmp_path / "mail.txt").write_text(GENKEY_TXT)
    local = DnsRecord(dkim.name, dkim.type, dkim.value, note=dkim.note, from_host=dkim.from_host
                      .replace("/etc/opendkim/keys/example.org", str(tmp_path)))
    records[i] = ("mx", local)
    values = read_values(records, {"mx": shell})
    assert values == {i: '"v=DKIM1; h=sha256; k=rsa; " '
                         '"p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx" "QIDAQAB"'}
    out = render(fleet, "mail.yaml", records, values)
    assert ('mail._domainkey   3600 IN TXT   "v=DKIM1; h=sha256; k=rsa; " '
            '"p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx" "QIDAQAB"\n') in out
    assert "placeholder" not in out


def test_knot_publishes_the_dkim_key_made_on_the_same_host(tmp_path: Path) -> None:
    """With the zone on the mail host, the rendered zone is a template without the DKIM
    placeholder; a guarded command appends the key read on the host, checks the zone and
    reloads it. Run here on copies: the result holds the key, the guard then holds."""
    plan = plans()["mx"]
    files = plan.files()
    template = files["/etc/knot/zones/example.org.zone.in"]
    assert "/etc/knot/zones/example.org.zone" not in files
    assert "_domainkey" not in template and "_mta-sts IN TXT" in template
    [cmd] = [s.command for s in plan.steps if isinstance(s, Run)
             and s.command.name.startswith("dns: zone example.org")]
    assert cmd.late and "kzonecheck -o example.org" in cmd.command
    assert "knotc zone-reload example.org" in cmd.command
    keys = tmp_path / "keys"
    keys.mkdir()
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "example.org.zone.in").write_text(template)

    def local(s: str) -> str:
        return (s.replace(knot.ZONES, str(zones)).replace("/etc/opendkim/keys/example.org",
                                                          str(keys))
                .replace("kzonecheck -o example.org", "true"))

    guard = local(cmd.unless or "")
    assert subprocess.run(["/bin/sh", "-c", guard]).returncode != 0  # no zone yet
    subprocess.run(["/bin/sh", "-c", local(cmd.command)], check=True)
    # No key generated yet: the zone is the template (the key comes with a later deploy).
    assert (zones / "example.org.zone").read_text() == template
    assert subprocess.run(["/bin/sh", "-c", guard]).returncode == 0
    (keys / "mail.txt").write_text(GENKEY_TXT)
    assert subprocess.run(["/bin/sh", "-c", guard]).returncode != 0  # the key appeared
    subprocess.run(["/bin/sh", "-c", local(cmd.command)], check=True)
    assert (zones / "example.org.zone").read_text() == template + (
        'mail._domainkey.example.org. IN TXT "v=DKIM1; h=sha256; k=rsa; " '
        '"p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx" "QIDAQAB"\n')
    assert subprocess.run(["/bin/sh", "-c", guard]).returncode == 0


def test_knot_zone_with_the_key_passes_kzonecheck(validators: Validators) -> None:
    plan = plans()["mx"]
    template = plan.files()["/etc/knot/zones/example.org.zone.in"]
    zone = template + ('mail._domainkey.example.org. IN TXT "v=DKIM1; h=sha256; k=rsa; " '
                       '"p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx" "QIDAQAB"\n')
    res = validators.check("trixie", "/var/tmp/example.org.zone", zone,
                           "kzonecheck -o example.org {path}")
    assert res.returncode == 0, (res.stdout + res.stderr).decode()


def test_a_zone_without_values_made_on_the_host_is_a_plain_file() -> None:
    d = data()
    del d["hosts"]["mx"]["services"]["mail"]
    d["hosts"]["mx"]["services"]["web"] = {"sites": [{"host": "www"}]}
    files = plans(d)["mx"].files()
    assert "/etc/knot/zones/example.org.zone" in files
    assert "/etc/knot/zones/example.org.zone.in" not in files


# ---------------------------------------------------------------------- smarthost relay


def test_the_relay_logs_in_over_verified_tls_and_the_password_stays_out_of_the_plan() -> None:
    plan = plans()["mx"]
    files = plan.files()
    main_cf = files[mail.MAIN_CF]
    for line in ("relayhost = [smtp.provider.net]:587",
                 "smtp_sasl_auth_enable = yes",
                 f"smtp_sasl_password_maps = texthash:{mail.SMARTHOST_PASSWORD}",
                 "smtp_sasl_security_options = noanonymous",
                 f"smtp_tls_policy_maps = texthash:{mail.SMARTHOST_TLS}"):
        assert line + "\n" in main_cf, line
    assert "smtp_tls_wrappermode" not in main_cf
    assert files[mail.SMARTHOST_TLS].endswith("[smtp.provider.net]:587 secure\n")
    [pw] = [s.file for s in plan.steps if isinstance(s, File)
            and s.file.path == mail.SMARTHOST_PASSWORD]
    assert pw.mode == "0600" and pw.owner == "root" and pw.opaque
    assert pw.content.endswith("[smtp.provider.net]:587 mx@provider.net:"
                               + mail.SECRET_MARK.format(0) + "\n")
    [pkgs] = [s for s in plan.steps if isinstance(s, Packages)]
    assert "libsasl2-modules" in pkgs.names


def test_the_relay_on_465_wraps_tls_and_can_skip_verification() -> None:
    d = data(relay={"host": "smtp.provider.net", "port": 465, "username": "u",
                    "password": {"env": "X"}, "verify_certificate": False})
    files = plans(d)["mx"].files()
    assert "relayhost = [smtp.provider.net]:465\n" in files[mail.MAIN_CF]
    assert "smtp_tls_wrappermode = yes\n" in files[mail.MAIN_CF]
    assert files[mail.SMARTHOST_TLS].endswith("[smtp.provider.net]:465 encrypt\n")
    without = plans(data(relay=None))["mx"].files()
    assert "relayhost" not in without[mail.MAIN_CF] and mail.SMARTHOST_PASSWORD not in without


@pytest.mark.parametrize("change,path,message", [
    ({"port": 25}, "relay.port", "587 (STARTTLS) or 465 (TLS)"),
    ({"host": "not a host"}, "relay.host", "not a domain name"),
    ({"username": "two words"}, "relay.username", "without spaces"),
    ({"password": "plain-text"}, "relay.password", ""),
    ({"spf_include": "bad domain!"}, "relay.spf_include", "not a domain name"),
])
def test_relay_mistakes_are_located(change: dict[str, Any], path: str, message: str) -> None:
    relay = {"host": "smtp.provider.net", "username": "u", "password": {"env": "X"}, **change}
    with pytest.raises(ConfigError) as exc:
        fleet_of(data(relay=relay))
    issues = [(i.path, i.message) for i in exc.value.issues]
    assert any(p.startswith(f"hosts.mx.services.mail.{path}") and message in m
               for p, m in issues), issues


def test_cli_prints_the_mail_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "mail.yaml"
    f.write_text(MODEL)
    assert main(["dns", str(f)]) == 0
    out = capsys.readouterr().out
    assert "_submissions._tcp 3600 IN SRV   0 1 465 mx.example.org.\n" in out


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_postconf_accepts_the_relay_settings(release: str, validators: Validators) -> None:
    """The release's postconf reads main.cf with the smarthost lines (587 and 465) without a
    warning, and refuses a misspelt one: the check can fail."""
    for port in (587, 465):
        d = data(relay={"host": "smtp.provider.net", "port": port, "username": "u",
                        "password": {"env": "X"}})
        fleet = fleet_of(d)
        plan = compile_fleet(fleet, {h: Target(release=release) for h in fleet.hosts})["mx"]
        validators.prepare(release, plan)
        [f] = [s.file for s in plan.steps if isinstance(s, File) and s.file.path == mail.MAIN_CF]
        assert f.validate is not None
        ok = validators.check(release, f.path, f.content, f.validate)
        assert ok.returncode == 0, (port, ok.stderr.decode())
        bad = f.content.replace("smtp_sasl_security_options", "smtp_sasl_securty_options")
        assert validators.check(release, f.path, bad, f.validate).returncode != 0
