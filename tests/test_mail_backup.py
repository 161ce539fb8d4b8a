"""The backup MX (examples/mail-backup.yaml): the primary's mail module asks a host of the
fleet to be its backup MX; that host's Postfix becomes a relay for the primary's existing
recipients only. Pinned: the backup's rendered files and `selfhost dns` output. (postconf of
each release checks the backup's main.cf in the example validator tests.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfhost.cli import main
from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import BackupMx, Certificate, Port, Sendmail
from selfhost.config import ConfigError, load_fleet, load_fleet_text
from selfhost.services import mail
from selfhost.validation import route

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mail-backup.yaml"
PINNED = ROOT / "tests" / "fixtures" / "mail" / "backup"
UPDATE = os.environ.get("SELFHOST_UPDATE_FIXTURES") == "1"
BACKUP_FILES = (mail.MAIN_CF, mail.RELAY_RECIPIENTS, mail.RELAY_TRANSPORT, mail.RELAY_TLS,
                mail.RELAY_SENDERS, mail.RELAY_ALIASES)


def data() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text()))


def files_of(model: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    text = EXAMPLE.read_text() if model is None else yaml.safe_dump(model)
    fleet = load_fleet_text(text, "mail-backup.yaml")
    plans = compile_fleet(fleet, {h: Target(release="trixie") for h in fleet.hosts})
    return {h: p.files() for h, p in plans.items()}


def test_the_backup_files_are_pinned() -> None:
    """The friend's Postfix files, as rendered from examples/mail-backup.yaml, equal their
    pinned copies (tests/fixtures/mail/backup/...)."""
    files = files_of()["friend"]
    for path in BACKUP_FILES:
        pinned = PINNED / path.lstrip("/")
        if UPDATE:
            pinned.parent.mkdir(parents=True, exist_ok=True)
            pinned.write_text(files[path])
        assert pinned.exists(), f"{pinned} is missing (SELFHOST_UPDATE_FIXTURES=1)"
        assert files[path] == pinned.read_text(), f"{path} differs from {pinned}"


def test_the_backup_accepts_only_the_primarys_recipients_and_relays_nothing_else() -> None:
    main_cf = files_of()["friend"][mail.MAIN_CF]
    assert "relay_domains = example.org\n" in main_cf
    assert f"relay_recipient_maps = texthash:{mail.RELAY_RECIPIENTS}\n" in main_cf
    assert "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n" in main_cf
    assert "mynetworks = 127.0.0.0/8 [::1]/128\n" in main_cf
    assert "maximal_queue_lifetime = 10d\n" in main_cf
    assert "virtual_mailbox" not in main_cf and "dovecot" not in main_cf


def test_the_recipients_follow_the_primarys_model() -> None:
    """A new mailbox, an alias and a catch-all on the primary change the backup's table."""
    model = data()
    svc = model["hosts"]["mx"]["services"]["mail"]
    svc["domains"].append({"name": "example.com", "catch_all": "carol@example.com"})
    svc["mailboxes"].append({"address": "carol@example.com", "password": {"env": "X"}})
    svc["aliases"].append({"address": "team@example.org", "to": ["bob@example.org"]})
    svc["backup_mx"]["queue_days"] = 20
    friend = files_of(model)["friend"]
    assert friend[mail.RELAY_RECIPIENTS].splitlines()[1:] == [
        "@example.com OK", "alice@example.org OK", "bob@example.org OK",
        "carol@example.com OK", "postmaster@example.org OK", "team@example.org OK"]
    assert friend[mail.RELAY_TRANSPORT].splitlines()[1:] == [
        "example.com smtp:[mx.example.org]:25", "example.org smtp:[mx.example.org]:25"]
    assert "relay_domains = example.com, example.org\n" in friend[mail.MAIN_CF]
    assert "maximal_queue_lifetime = 20d\n" in friend[mail.MAIN_CF]


def test_requests_on_both_hosts() -> None:
    routed = route(load_fleet(EXAMPLE))
    assert routed["mx"].problems == [] and routed["friend"].problems == []
    [out] = routed["mx"].outgoing
    assert isinstance(out, BackupMx)
    assert (out.on_host, out.primary, out.domains) == ("friend", "mx.example.org",
                                                        ("example.org",))
    assert out.origin == "services.mail.backup_mx"
    friend = routed["friend"].requests
    assert friend[BackupMx] == [out]
    [cert] = friend[Certificate]
    assert cert.names == ("friend.example.net",) and cert.reload == ("postfix.service",)
    assert {(p.port, p.proto) for p in friend[Port] if isinstance(p, Port)
            and p.origin == "backup-mx"} == {(25, "tcp")}
    assert [s.package for s in friend[Sendmail] if isinstance(s, Sendmail)] == ["postfix"]


def test_the_primary_exempts_its_backup_from_client_checks_but_not_from_relaying() -> None:
    mx = files_of()["mx"]
    assert mx[mail.BACKUP_MX_CLIENTS].splitlines()[1:] == ["203.0.113.20/32 OK"]
    main_cf = mx[mail.MAIN_CF]
    assert (f"smtpd_client_restrictions = check_client_access cidr:{mail.BACKUP_MX_CLIENTS}\n"
            in main_cf)
    assert "mynetworks = 127.0.0.0/8 [::1]/128\n" in main_cf  # never an open relay for it
    # Without a backup MX, neither the table nor the setting.
    model = data()
    del model["hosts"]["mx"]["services"]["mail"]["backup_mx"]
    files = files_of(model)
    assert mail.BACKUP_MX_CLIENTS not in files["mx"]
    assert "smtpd_client_restrictions" not in files["mx"][mail.MAIN_CF]
    assert not any("postfix" in p for p in files["friend"])  # nothing on the friend's host


def test_msmtp_steps_back_on_the_backup_and_root_mail_reaches_the_admin() -> None:
    model = data()
    model["hosts"]["friend"]["notify"] = {
        "email": "admin@example.net",
        "smtp": {"host": "smtp.example.net", "user": "me@example.net",
                 "password": {"env": "SMTP_PASSWORD"}}}
    fleet = load_fleet_text(yaml.safe_dump(model), "mail-backup.yaml")
    plan = compile_fleet(fleet, {h: Target(release="bookworm") for h in fleet.hosts})["friend"]
    packages = next(s.names for s in plan.steps if type(s).__name__ == "Packages")
    assert "postfix" in packages and "msmtp-mta" not in packages
    assert plan.files()[mail.RELAY_ALIASES].splitlines()[1:] == [
        "root@friend.example.net admin@example.net",
        "postmaster@friend.example.net admin@example.net"]


DNS = """\
; ---- zone example.org
$ORIGIN example.org.
@                 3600 IN MX    10 mx.example.org.
@                 3600 IN MX    20 friend.example.net.
@                 3600 IN TXT   "v=spf1 mx -all"
@                 3600 IN CAA   0 issue "letsencrypt.org" ; Caddy's ACME CAs
@                 3600 IN CAA   0 issue "sectigo.com"
_dmarc            3600 IN TXT   "v=DMARC1; p=quarantine; adkim=s; aspf=s"
_imap._tcp        3600 IN SRV   0 0 0 .
_imaps._tcp       3600 IN SRV   0 1 993 mx.example.org.
_mta-sts          3600 IN TXT   "v=STSv1; id=15c10e1292595e5f79da"
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

def test_selfhost_dns_prints_the_backup_mx_with_a_higher_preference(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dns", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert DNS in out, out


@pytest.mark.parametrize("change,message", [
    ({"host": "nobody"}, "no host 'nobody' in this fleet"),
    ({"host": "mx"}, "cannot be its own backup MX"),
    ({"host": "friend", "queue_days": 1}, "must be at least 5"),
])
def test_backup_mx_mistakes_are_located(change: dict[str, Any], message: str) -> None:
    model = data()
    model["hosts"]["mx"]["services"]["mail"]["backup_mx"] = change
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(yaml.safe_dump(model), "mail-backup.yaml")
    issues = [(i.path, i.message) for i in exc.value.issues]
    assert any(p.startswith("hosts.mx.services.mail.backup_mx") and message in m
               for p, m in issues), issues


def test_a_backup_with_its_own_mail_server_is_refused() -> None:
    model = data()
    model["hosts"]["friend"]["services"] = {"mail": {
        "domains": [{"name": "example.net"}],
        "mailboxes": [{"address": "dan@example.net", "password": {"env": "X"}}]}}
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(yaml.safe_dump(model), "mail-backup.yaml")
    issues = [(i.path, i.message) for i in exc.value.issues]
    assert ("hosts.mx.services.mail.backup_mx.host",
            "friend runs a mail server of its own: a backup MX on a host with a mail service "
            "is not supported yet (both would own its Postfix); choose a host without one"
            ) in issues, issues


def test_two_primaries_cannot_share_a_domain_on_one_backup() -> None:
    model = data()
    other = yaml.safe_load(yaml.safe_dump(model["hosts"]["mx"]))
    other["hostname"] = "mx2"
    other["addresses"] = {"public": ["198.51.100.11"]}
    model["hosts"]["mx2"] = other
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(yaml.safe_dump(model), "mail-backup.yaml")
    messages = [i.message for i in exc.value.issues]
    assert any("asked to be the backup MX of example.org by both mx.example.org and "
               "mx2.example.org" in m for m in messages), messages
