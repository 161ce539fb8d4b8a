"""The mail module: model rules, what it requests of the others, what it renders for each
Debian release (pinned), and the rendered files' own validators (real postconf, doveconf and
opendkim of each release, in the validators' container)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import update_fixtures as updater
import yaml
from pydantic import ValidationError
from validators import Validators

from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import (
    Certificate,
    DnsRecord,
    HealthCheck,
    Jail,
    Port,
    Sendmail,
    SystemUser,
)
from selfhost.compose.route import route_host
from selfhost.models.fleet import Fleet
from selfhost.services import mail
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mail.yaml"
PINNED = ROOT / "tests" / "fixtures" / "mail"
RELEASES = ("bookworm", "trixie")
UPDATE = os.environ.get("SELFHOST_UPDATE_FIXTURES") == "1"
"""Set to 1 to rewrite the pinned files from the current rendering (then review the diff)."""

MAIL_FILES = (mail.MAIN_CF, mail.MASTER_CF, mail.MAILBOXES, mail.ALIASES, mail.SENDERS,
              mail.SUBMISSION_HEADERS, mail.LOCAL_SENDERS, mail.USERS, mail.DOVECOT_CONF, mail.OPENDKIM_CONF,
              mail.KEY_TABLE, mail.SIGNING_TABLE, mail.POSTFWD_CF, mail.SPAM_CF,
              mail.SPAMD_DROPIN, mail.SPAMASS_UNIT, mail.SPAM_SIEVE, mail.SEND_ONLY,
              mail.SEND_ONLY_USERS)


def model(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["mail"].update(copy.deepcopy(changes))
    return data


def plan_of(data: dict[str, Any], release: str = "bookworm") -> Any:
    [plan] = compile_fleet(Fleet.of(validated(data)),
                           {"nas": Target(release=release, in_container=True)}).values()
    return plan


@pytest.mark.parametrize("release", RELEASES)
def test_rendered_files_are_pinned(release: str) -> None:
    """Every file of the mail module, as rendered from examples/mail.yaml for the release,
    equals its pinned copy (tests/fixtures/mail/RELEASE/...)."""
    files = plan_of(yaml.safe_load(EXAMPLE.read_text()), release).files()
    for path in MAIL_FILES:
        pinned = PINNED / release / path.lstrip("/")
        if UPDATE:
            pinned.parent.mkdir(parents=True, exist_ok=True)
            pinned.write_text(files[path])
        assert pinned.exists(), f"{pinned} is missing (SELFHOST_UPDATE_FIXTURES=1)"
        assert files[path] == pinned.read_text(), f"{path} differs from {pinned}"


def test_dovecot_configuration_follows_the_release() -> None:
    old = plan_of(model(), "bookworm").files()
    new = plan_of(model(), "trixie").files()
    assert "mail_location = maildir:~/Maildir" in old[mail.DOVECOT_CONF]
    assert "ssl_cert = </etc/selfhost/tls/nas.home.arpa/fullchain.pem" in old[mail.DOVECOT_CONF]
    assert "dovecot_config_version = 2.4.0" in new[mail.DOVECOT_CONF]
    assert "mail_driver = maildir" in new[mail.DOVECOT_CONF]
    assert "mail_location" not in new[mail.DOVECOT_CONF]
    # Per-mailbox quota: a quota rule (2.3) or the quota size setting (2.4) from the userdb.
    assert "userdb_quota_rule=*:storage=1M" in old[mail.USERS]
    assert "userdb_quota_storage_size=1M" in new[mail.USERS]
    for files in (old, new):
        assert "port = 0" in files[mail.DOVECOT_CONF]  # no plaintext IMAP on 143
        assert "ssl = required" in files[mail.DOVECOT_CONF]
    assert "quota_grace = 0" in old[mail.DOVECOT_CONF]  # no overrun (2.4: 10 MB by default)
    assert "quota_storage_grace = 0" in new[mail.DOVECOT_CONF]


def test_passwords_reach_the_server_only_as_bcrypt_hashes() -> None:
    plan = plan_of(model())
    users = next(s.file for s in plan.steps
                 if type(s).__name__ == "File" and s.file.path == mail.USERS)
    assert users.mode == "0640" and users.group == "dovecot"
    assert [(p.ref.env, p.transform) for p in users.secrets] == [
        ("MAIL_ALICE_PASSWORD", "bcrypt"), ("MAIL_BOB_PASSWORD", "bcrypt")]
    assert "{BLF-CRYPT}@@selfhost-secret-0@@" in users.content
    assert "PASSWORD" not in users.content


def test_submission_rules_and_private_headers() -> None:
    files = plan_of(model()).files()
    master = files[mail.MASTER_CF]
    for service in ("submission inet", "submissions inet"):
        assert service in master
    assert master.count("-o smtpd_tls_security_level=encrypt") == 2
    assert master.count("-o smtpd_tls_auth_only=yes") == 2
    assert master.count("reject_sender_login_mismatch") == 2
    assert "-o smtpd_tls_wrappermode=yes" in master
    assert "smtpd_sasl_auth_enable = no" in files[mail.MAIN_CF]  # no login on port 25
    assert "/^Received:/ IGNORE" in files[mail.SUBMISSION_HEADERS]
    assert "/^User-Agent:/ IGNORE" in files[mail.SUBMISSION_HEADERS]
    senders = files[mail.SENDERS]
    assert "alice@home.arpa alice@home.arpa\n" in senders
    assert "family@home.arpa alice@home.arpa,bob@home.arpa\n" in senders
    assert "postmaster@home.arpa alice@home.arpa\n" in senders


def test_catch_all_keeps_the_mailboxes_own_mail() -> None:
    files = plan_of(model(domains=[{"name": "home.arpa", "catch_all": "alice@home.arpa"}]))\
        .files()
    aliases = files[mail.ALIASES]
    assert "bob@home.arpa bob@home.arpa\n" in aliases
    assert "\n@home.arpa alice@home.arpa\n" in aliases


def test_dkim_keys_are_generated_on_the_server_and_the_first_selector_signs() -> None:
    plan = plan_of(model())
    runs = [s.command for s in plan.steps if type(s).__name__ == "Run"]
    gen = [c for c in runs if "opendkim-genkey" in c.command]
    assert [c.unless for c in gen] == [
        "test -s /etc/opendkim/keys/home.arpa/s2026.private",
        "test -s /etc/opendkim/keys/home.arpa/s2025.private"]
    files = plan.files()
    assert files[mail.SIGNING_TABLE].splitlines()[1] == "*@home.arpa s2026._domainkey.home.arpa"
    assert "s2025._domainkey.home.arpa home.arpa:s2025:" in files[mail.KEY_TABLE]
    assert "BEGIN" not in "".join(files.values())  # no key material in the plan


def test_requests_of_the_mail_module() -> None:
    server = validated(model())
    routed = route_host(Fleet.of(server), "nas", server.modules())
    req = routed.requests
    assert routed.problems == []
    [cert] = req[Certificate]
    assert cert.names == ("nas.home.arpa",)
    assert set(cert.reload) == {"postfix.service", "dovecot.service"}
    ports = {(p.port, p.proto) for p in req[Port] if p.origin == "services.mail"}
    assert ports == {(25, "tcp"), (465, "tcp"), (587, "tcp"), (993, "tcp"), (995, "tcp"),
                     (4190, "tcp")}  # the example asks for POP3S and ManageSieve
    assert any(u.name == "vmail" for u in req[SystemUser] if isinstance(u, SystemUser))
    assert {j.name for j in req[Jail] if isinstance(j, Jail)} >= {"postfix-sasl", "dovecot"}
    assert [s.package for s in req[Sendmail] if isinstance(s, Sendmail)] == ["postfix"]
    dns = {(d.name, d.type): d.value for d in req[DnsRecord] if isinstance(d, DnsRecord)}
    assert dns[("home.arpa", "MX")] == "10 nas.home.arpa."
    assert dns[("home.arpa", "TXT")] == '"v=spf1 mx -all"'
    assert "p=quarantine" in dns[("_dmarc.home.arpa", "TXT")]
    assert dns[("s2026._domainkey.home.arpa", "TXT")] == '"v=DKIM1; k=rsa; p=<public key>"'
    assert ("s2025._domainkey.home.arpa", "TXT") in dns
    plan = plan_of(model())
    assert {d.path for d in plan.data} >= {"/var/vmail", "/etc/opendkim/keys"}


def test_msmtp_steps_back_for_the_mail_server() -> None:
    data = model()
    data["notify"] = {"email": "admin@example.org",
                      "smtp": {"host": "smtp.example.org", "user": "me@example.org",
                               "password": {"env": "SMTP_PASSWORD"}}}
    plan = plan_of(data)
    packages = next(s.names for s in plan.steps if type(s).__name__ == "Packages")
    assert "postfix" in packages and "msmtp-mta" not in packages
    files = plan.files()
    assert "/etc/msmtprc" not in files
    assert "root@nas.home.arpa admin@example.org\n" in files[mail.ALIASES]
    # Without the mail server, notify keeps the role.
    del data["services"]
    plan = plan_of(data)
    assert "msmtp-mta" in next(s.names for s in plan.steps if type(s).__name__ == "Packages")


@pytest.mark.parametrize("changes,loc,message", [
    ({"mailboxes": [{"address": "carol@example.org", "password": {"env": "X"}}]},
     "services.mail.mailboxes.0.address", "example.org is not one of the mail domains"),
    ({"aliases": [{"address": "team@home.arpa", "to": ["nobody@home.arpa"]}]},
     "services.mail.aliases.0.to.0", "is no mailbox or alias"),
    ({"aliases": [{"address": "team@elsewhere.org", "to": ["alice@home.arpa"]}]},
     "services.mail.aliases.0.address", "not in one of the mail domains"),
    ({"aliases": [{"address": "alice@home.arpa", "to": ["bob@home.arpa"]}]},
     "services.mail.aliases.0.address", "both a mailbox and an alias"),
    ({"domains": [{"name": "home.arpa"}, {"name": "empty.home.arpa",
                                          "catch_all": "alice@home.arpa"}]},
     "services.mail.domains.1.catch_all", "which has no mailbox"),
    ({"domains": [{"name": "home.arpa", "catch_all": "carol@home.arpa"}]},
     "services.mail.domains.0.catch_all", "is not a mailbox"),
    ({"domains": [{"name": "home.arpa"}, {"name": "nas.home.arpa"}]},
     "services.mail.domains.1.name", "the server's own name"),
    ({"mailboxes": [{"address": "alice@home.arpa", "password": {"env": "X"}},
                    {"address": "alice@home.arpa", "password": {"env": "Y"}}], "aliases": []},
     "services.mail.mailboxes.1.address", "listed twice"),
    # Send-only accounts receive nothing: no quota, no alias or catch-all to them.
    ({"mailboxes": [{"address": "alice@home.arpa", "password": {"env": "X"}},
                    {"address": "app@home.arpa", "password": {"env": "Y"}, "send_only": True,
                     "quota_mb": 10}], "aliases": []},
     "services.mail.mailboxes.1.quota_mb", "is send-only: it stores no mail"),
    ({"aliases": [{"address": "team@home.arpa", "to": ["alice@home.arpa",
                                                       "noreply@home.arpa"]}]},
     "services.mail.aliases.0.to.1", "noreply@home.arpa is send-only"),
    ({"domains": [{"name": "home.arpa", "catch_all": "noreply@home.arpa"}]},
     "services.mail.domains.0.catch_all", "is send-only"),
    ({"domains": [{"name": "home.arpa", "tls_reports": "noreply@home.arpa"}]},
     "services.mail.domains.0.tls_reports", "is send-only"),
    ({"domains": [{"name": "home.arpa"}, {"name": "apps.home.arpa",
                                          "catch_all": "app@apps.home.arpa"}],
      "mailboxes": [{"address": "alice@home.arpa", "password": {"env": "X"}},
                    {"address": "app@apps.home.arpa", "password": {"env": "Y"},
                     "send_only": True}], "aliases": []},
     "services.mail.domains.1.catch_all", "which has no mailbox"),
])
def test_bad_combinations_are_refused_at_their_path(changes: dict[str, Any], loc: str,
                                                     message: str) -> None:
    with pytest.raises(ModelError) as err:
        validated(model(**changes))
    text = str(err.value)
    assert message in text and loc in text, text


@pytest.mark.parametrize("changes,message", [
    ({"mailboxes": [{"address": "not an address", "password": {"env": "X"}}]},
     "is not a mail address"),
    ({"domains": [{"name": "localhost"}]}, "is not a domain name"),
    ({"domains": [{"name": "home.arpa", "dkim_selectors": ["a", "a"]}]}, "listed twice"),
    ({"domains": [{"name": "home.arpa", "dkim_selectors": ["bad_selector"]}]},
     "not a DKIM selector"),
    ({"mailboxes": [{"address": "alice@home.arpa", "password": "plaintext"}]}, "password"),
])
def test_bad_values_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises((ValidationError, ModelError), match=message):
        validated(model(**changes))


def test_send_only_account_sends_but_receives_nothing() -> None:
    """noreply@ (send_only in the example): a submission login that owns its address, no
    Maildir, refused at RCPT on port 25, in no userdb, only in the file Postfix's SASL
    logins (service smtp) find; the backup MX does not accept mail for it."""
    for release in RELEASES:
        files = plan_of(model(), release).files()
        assert "noreply@home.arpa noreply@home.arpa\n" in files[mail.SENDERS]
        assert "noreply" not in files[mail.MAILBOXES] and "noreply" not in files[mail.USERS]
        assert "noreply@home.arpa:{BLF-CRYPT}@@selfhost-secret-0@@::::::" in \
            files[mail.SEND_ONLY_USERS]
        assert files[mail.SEND_ONLY].endswith("noreply@home.arpa 550 5.1.1 <noreply@home.arpa>: "
                                              "this address only sends mail, it receives none\n")
        assert "smtpd_recipient_restrictions = check_recipient_access texthash:" \
            f"{mail.SEND_ONLY}" in files[mail.MAIN_CF]
        conf = files[mail.DOVECOT_CONF]
        service = "%s" if release == "bookworm" else "%{protocol}"
        assert f"/etc/dovecot/selfhost-send-only.{service}\n" in conf
        assert conf.count("userdb") == 1 and "selfhost-send-only" not in conf.split("userdb")[1]
    # With a catch-all, the send-only address maps to itself, never to the catch-all.
    aliases = plan_of(model(domains=[{"name": "home.arpa", "catch_all": "alice@home.arpa"}]))\
        .files()[mail.ALIASES]
    assert "noreply@home.arpa noreply@home.arpa\n" in aliases
    svc = validated(model()).services.mail
    assert svc is not None and "noreply@home.arpa" not in svc.recipients()
    # Without send-only accounts: no table, no restriction, no passdb.
    data = model()
    data["services"]["mail"]["mailboxes"] = data["services"]["mail"]["mailboxes"][:2]
    files = plan_of(data).files()
    assert mail.SEND_ONLY not in files and mail.SEND_ONLY_USERS not in files
    assert "smtpd_recipient_restrictions" not in files[mail.MAIN_CF]
    assert "selfhost-send-only" not in files[mail.DOVECOT_CONF]


def test_pop3s_and_managesieve_only_when_asked() -> None:
    server = validated(model())
    routed = route_host(Fleet.of(server), "nas", server.modules())
    [jail] = [j for j in routed.requests[Jail] if isinstance(j, Jail) and j.name == "dovecot"]
    assert jail.port == "imaps,pop3s,4190"
    checks = {(h.kind, h.target) for h in routed.requests[HealthCheck]
              if isinstance(h, HealthCheck)}
    assert {("tcp", "127.0.0.1:995"), ("tcp", "127.0.0.1:4190")} <= checks
    dns = {(d.name, d.type): d.value for d in routed.requests[DnsRecord]
           if isinstance(d, DnsRecord)}
    assert dns[("_pop3s._tcp.home.arpa", "SRV")] == "0 1 995 nas.home.arpa."
    assert dns[("_sieve._tcp.home.arpa", "SRV")] == "0 1 4190 nas.home.arpa."
    assert dns[("_pop3._tcp.home.arpa", "SRV")] == "0 0 0 ."  # plaintext POP3: never
    for release in RELEASES:
        plan = plan_of(model(), release)
        packages = next(s.names for s in plan.steps if type(s).__name__ == "Packages")
        assert {"dovecot-pop3d", "dovecot-managesieved"} <= set(packages)
        conf = plan.files()[mail.DOVECOT_CONF]
        assert "protocols = imap lmtp pop3 sieve" in conf
        pop3 = conf.split("service pop3-login {")[1].split("\n}\n")[0]
        assert "inet_listener pop3 {\n    port = 0\n" in pop3  # never 110
        assert "port = 995\n    ssl = yes" in pop3
        assert "inet_listener sieve {\n    port = 4190\n" in conf
        assert "ssl = required" in conf  # STARTTLS before any login on 4190
    # Off by default: none of it.
    data = model()
    del data["services"]["mail"]["pop3s"], data["services"]["mail"]["managesieve"]
    server = validated(data)
    routed = route_host(Fleet.of(server), "nas", server.modules())
    assert {p.port for p in routed.requests[Port] if isinstance(p, Port)}.isdisjoint({995, 4190, 110})
    [jail] = [j for j in routed.requests[Jail] if isinstance(j, Jail) and j.name == "dovecot"]
    assert jail.port == "imaps"
    dns = {(d.name, d.type): d.value for d in routed.requests[DnsRecord]
           if isinstance(d, DnsRecord)}
    assert dns[("_pop3s._tcp.home.arpa", "SRV")] == "0 0 0 ."
    assert ("_sieve._tcp.home.arpa", "SRV") not in dns
    plan = plan_of(data, "trixie")
    packages = next(s.names for s in plan.steps if type(s).__name__ == "Packages")
    assert "dovecot-pop3d" not in packages and "dovecot-managesieved" not in packages
    conf = plan.files()[mail.DOVECOT_CONF]
    assert "protocols = imap lmtp\n" in conf and "pop3" not in conf and "4190" not in conf


def _broken(path: str, text: str) -> str:
    if path == mail.MAIN_CF:
        return text + "smtpd_no_such_parameter = yes\n"
    if path == mail.MASTER_CF:
        return text + "broken inet n - y\n"
    if path == mail.DOVECOT_CONF:
        return text + "no_such_setting = yes\n"
    if path == mail.OPENDKIM_CONF:
        return text + "NoSuchOption yes\n"
    if path == mail.POSTFWD_CF:
        return "# no rule left\nthis is no rule\n"
    if path == mail.SPAM_CF:
        return text + "no_such_directive 3\n"
    if path == mail.SPAM_SIEVE:
        return text.replace('fileinto :create "Junk";', 'fileinto :create "Junk"')
    raise AssertionError(path)


@pytest.mark.parametrize("release", RELEASES)
def test_mail_validators_accept_the_files_and_reject_broken_ones(
        release: str, validators: Validators) -> None:
    """postconf, doveconf, opendkim, postfwd, spamassassin --lint and sievec of the release
    accept the rendered files and refuse a
    broken version of each: the checks can fail."""
    [plan] = updater.example_plans(EXAMPLE, release)
    validators.prepare(release, plan)
    checked = [s.file for s in plan.steps if type(s).__name__ == "File"
               and s.file.path in MAIL_FILES and s.file.validate]
    assert {f.path for f in checked} == {mail.MAIN_CF, mail.MASTER_CF, mail.DOVECOT_CONF,
                                         mail.OPENDKIM_CONF, mail.POSTFWD_CF, mail.SPAM_CF,
                                         mail.SPAM_SIEVE}
    for f in checked:
        assert f.validate is not None
        ok = validators.check(release, f.path, updater.rendered(f), f.validate)
        assert ok.returncode == 0, (f.path, ok.stderr.decode())
        bad = validators.check(release, f.path, _broken(f.path, f.content), f.validate)
        assert bad.returncode != 0, f"{f.path}: a broken file was accepted on {release}"
    # Dovecot 2.4's configuration is not Dovecot 2.3's: each is checked on its own release.
    other = "trixie" if release == "bookworm" else "bookworm"
    [other_plan] = updater.example_plans(EXAMPLE, other)
    conf = other_plan.files()[mail.DOVECOT_CONF]
    assert validators.check(release, mail.DOVECOT_CONF, conf,
                            "doveconf -n -c {path} >/dev/null").returncode != 0
