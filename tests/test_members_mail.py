"""Members' mailboxes: the association asks the mail module for them (``MailAccount``), the
mail module renders them with its own (one passwd-file, one quota mechanism, one set of maps,
postfwd and the first-time recipients service with the plan's limits), errors point at the
member's model path, and each member's Maildir is a backup source of its own."""

from __future__ import annotations

import copy
import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from validators import Validators

from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import BackupSource, MailAccount, MailLimits
from selfhost.compose.resources import SECRET_MARK
from selfhost.compose.route import route_host
from selfhost.models.fleet import Fleet
from selfhost.services import mail
from selfhost.services import mail_recipients as rcpt
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "association.yaml"
RELEASES = ("bookworm", "trixie")
HEAD = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"


def data() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))


def members(d: dict[str, Any]) -> list[dict[str, Any]]:
    return list(d["services"]["association"]["members"])


def plan_of(d: dict[str, Any] | None = None, release: str = "bookworm") -> Any:
    [plan] = compile_fleet(Fleet.of(validated(d or data())),
                           {"asso": Target(release=release,  # type: ignore[arg-type]
                                           in_container=True)}).values()
    return plan


def file_of(plan: Any, path: str) -> Any:
    return next(s.file for s in plan.steps if type(s).__name__ == "File" and s.file.path == path)


def routed(d: dict[str, Any] | None = None) -> Any:
    server = validated(d or data())
    fleet = Fleet.of(server)
    [host] = fleet.hosts
    return route_host(fleet, host, server.modules())


def test_the_association_asks_the_mail_module_for_each_mailbox() -> None:
    accounts = routed().requests[MailAccount]
    alpha, bravo, charlie = accounts
    assert (alpha.address, alpha.quota_mb, alpha.aliases, alpha.local_login, alpha.owner,
            alpha.origin, alpha.aliases_origin) == (
        "alpha", 1024, ("webmaster-alpha",), "alpha", "member alpha",
        "services.association.members.0.mailboxes.0", "services.association.members.0.aliases")
    assert alpha.limits == MailLimits(20, 300, 50) == bravo.limits
    assert alpha.password.env == "ASSO_ALPHA_PASSWORD"
    assert (charlie.address, charlie.quota_mb, charlie.limits) == ("charlie", 1, None)


@pytest.mark.parametrize("release,quota", [("bookworm", "userdb_quota_rule=*:storage={}M"),
                                            ("trixie", "userdb_quota_storage_size={}M")])
def test_passwd_file_has_one_line_per_member_mailbox(release: str, quota: str) -> None:
    f = file_of(plan_of(release=release), mail.USERS)
    assert f.content == (
        "# Managed by selfhost: the mailboxes (bcrypt hashes of their passwords).\n"
        f"alpha@asso.example:{{BLF-CRYPT}}{SECRET_MARK.format(0)}::::::{quota.format(1024)}\n"
        f"anna@asso.example:{{BLF-CRYPT}}{SECRET_MARK.format(1)}::::::{quota.format(2048)}\n"
        f"bravo@asso.example:{{BLF-CRYPT}}{SECRET_MARK.format(2)}::::::{quota.format(1024)}\n"
        f"bruno@asso.example:{{BLF-CRYPT}}{SECRET_MARK.format(3)}::::::{quota.format(2048)}\n"
        f"charlie@asso.example:{{BLF-CRYPT}}{SECRET_MARK.format(4)}::::::{quota.format(1)}\n")
    assert [(s.ref.env, s.transform) for s in f.secrets] == [
        ("ASSO_ALPHA_PASSWORD", "bcrypt"), ("ASSO_ANNA_MAIL_PASSWORD", "bcrypt"),
        ("ASSO_BRAVO_PASSWORD", "bcrypt"), ("ASSO_BRUNO_MAIL_PASSWORD", "bcrypt"),
        ("ASSO_CHARLIE_PASSWORD", "bcrypt")]
    assert f.mode == "0640" and f.group == "dovecot"


def test_maps_deliver_the_members_mailboxes_and_aliases() -> None:
    files = plan_of().files()
    assert files[mail.MAILBOXES] == HEAD + (
        "alpha@asso.example asso.example/alpha/\nanna@asso.example asso.example/anna/\n"
        "bravo@asso.example asso.example/bravo/\nbruno@asso.example asso.example/bruno/\n"
        "charlie@asso.example asso.example/charlie/\n")
    assert files[mail.ALIASES].endswith(
        "webmaster-alpha@asso.example alpha@asso.example\n"), files[mail.ALIASES]
    # The owner may send as its alias (submission's sender check).
    assert "webmaster-alpha@asso.example alpha@asso.example\n" in files[mail.SENDERS]


def test_the_plans_limits_apply_to_the_login_and_the_members_unix_user() -> None:
    files = plan_of().files()
    rules = files[mail.POSTFWD_CF].splitlines()
    over = "450 4.7.1 Outbound limit: $$sasl_username (member alpha) may send"
    assert ("id=SELFHOST_ACCOUNT_0_MINUTE; protocol_state==END-OF-MESSAGE; "
            "sasl_username==alpha@asso.example; action=rate(sasl_username/20/60/"
            f"{over} 20 per minute, try again later)") in rules
    assert ("id=SELFHOST_ACCOUNT_0_DAY; protocol_state==END-OF-MESSAGE; "
            "sasl_username==alpha@asso.example; action=rate(sasl_username/300/86400/"
            f"{over} 300 per day, try again later)") in rules
    assert ("id=SELFHOST_LOCAL_ACCOUNT_1_MINUTE; protocol_state==END-OF-MESSAGE; "
            "server_port==10026; sender==alpha@asso.asso.example; action=rate(sender/20/60/"
            "HOLD Outbound limit: $$sender (member alpha) may send 20 per minute, held for the "
            "admin)") in rules
    # The general rules (the example: 10 a minute) count everyone else (charlie's plan has
    # no limits of its own).
    others = r"(?:alpha@asso\.example|bravo@asso\.example)"
    assert ("id=SELFHOST_MINUTE; protocol_state==END-OF-MESSAGE; sasl_username=~/^(?!"
            + others + "$)./; action=rate(sasl_username/10/60/450 4.7.1 Outbound limit: "
            "$$sasl_username may send 10 per minute, try again later)") in rules
    local = r"(?:alpha@asso\.asso\.example|bravo@asso\.asso\.example)"
    assert any(r.startswith("id=SELFHOST_LOCAL_MINUTE;") and f"sender=~/^(?!{local}$)./;" in r
               for r in rules), rules
    master = files[mail.MASTER_CF]
    for sender in ("alpha@asso.example", "alpha@asso.asso.example", "bravo@asso.example",
                   "bravo@asso.asso.example"):
        assert f"  --limit {sender}=50\n" in master
    assert "charlie" not in master


def test_without_accounts_the_general_rules_are_unchanged() -> None:
    d = data()
    del d["services"]["radicale"]  # no member password: no one to log in there
    for m in members(d):
        for key in ("mailboxes", "aliases", "password"):
            m.pop(key, None)
    files = plan_of(d).files()
    assert "sasl_username=~/./; " in files[mail.POSTFWD_CF]
    assert "SELFHOST_ACCOUNT" not in files[mail.POSTFWD_CF]
    assert "--limit" not in files[mail.MASTER_CF]
    sources = [(r.path, r.origin) for r in routed(d).requests[BackupSource]]
    assert ("/var/vmail", "services.mail") in sources


def test_each_members_maildir_is_a_backup_source_of_its_own() -> None:
    sources = [(r.path, r.origin) for r in routed().requests[BackupSource]]
    for i, m in enumerate(("alpha", "bravo", "charlie")):
        assert (f"/var/vmail/asso.example/{m}",
                f"services.association.members.{i}.mailboxes.0") in sources
    assert not any(p == "/var/vmail" for p, _ in sources)  # no Maildir backed up twice


def _member(d: dict[str, Any], i: int, **changes: Any) -> dict[str, Any]:
    members(d)[i].update(changes)
    return d


def _without_mail(d: dict[str, Any]) -> dict[str, Any]:
    del d["services"]["mail"]
    return d


def _mail_mailbox(d: dict[str, Any]) -> dict[str, Any]:
    d["services"]["mail"]["mailboxes"] = [{"address": "alpha@asso.example",
                                           "password": {"env": "X"}}]
    return d


@pytest.mark.parametrize("change,loc,message", [
    (lambda d: _member(d, 0, mailboxes=["alpha@other.example"]),
     "services.association.members.0.mailboxes.0",
     "alpha@other.example: other.example is not one of the mail domains (asso.example)"),
    (lambda d: _member(d, 0, aliases=["info@other.example"]),
     "services.association.members.0.aliases.0", "other.example is not one of the mail domains"),
    (_mail_mailbox, "services.association.members.0.mailboxes.0",
     "alpha@asso.example is already the mail service's mailbox or alias "
     "(services.mail.mailboxes.0.address)"),
    (lambda d: _member(d, 1, aliases=["alpha"]), "services.association.members.1.aliases.0",
     "alpha@asso.example is already another mailbox or alias "
     "(services.association.members.0.mailboxes.0)"),
    (lambda d: _member(d, 1, mailboxes=["alpha"]), "services.association.members.1.mailboxes.0",
     "mailbox alpha is requested by both services.association.members.0.mailboxes.0 and "
     "services.association.members.1.mailboxes.0"),
    (lambda d: _member(d, 2, mailboxes=["charlie", "info"]),
     "services.association.members.2.mailboxes", "2 mailboxes, but plan small allows 1"),
    (lambda d: _member(d, 2, password=None), "services.association.members.2.password",
     "member charlie has mailboxes: give password"),
    (lambda d: _member(d, 2, mailboxes=[], aliases=["info"]),
     "services.association.members.2.aliases", "aliases go to its first mailbox"),
    (_without_mail, "services.association.members.0.mailboxes",
     "member alpha has mailboxes but this host has no mail service: add services.mail"),
])
def test_member_mail_errors_point_at_the_member(change: Any, loc: str, message: str) -> None:
    d = change(data())
    for m in members(d):
        if "password" in m and m["password"] is None:
            del m["password"]
    with pytest.raises(ModelError) as err:
        validated(d)
    assert f"{loc}: " in str(err.value) and message in str(err.value), str(err.value)


def test_a_model_alias_may_deliver_to_a_members_mailbox() -> None:
    d = data()
    d["services"]["mail"]["aliases"] = [{"address": "board@asso.example",
                                         "to": ["alpha@asso.example", "bravo@asso.example"]}]
    files = plan_of(d).files()
    assert "board@asso.example alpha@asso.example, bravo@asso.example\n" in files[mail.ALIASES]


@pytest.mark.parametrize("address", ["Alpha Beta", "-alpha", "alpha@", "a@b"])
def test_member_mailbox_names_are_checked(address: str) -> None:
    d = _member(data(), 0, mailboxes=[address])
    with pytest.raises(ValidationError) as err:
        validated(d)
    assert "services.association.members.0.mailboxes" in str(err.value)
    assert "a local part (a-z 0-9 . _ + -) or a full address" in str(err.value)


def test_first_time_recipients_use_a_senders_own_limit() -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute(rcpt.SCHEMA)

    def ask(sender: str, n: int) -> str:
        return rcpt.decide(db, {"sasl_username": sender, "recipient": f"r{n}@far.example"},
                           5, frozenset({"asso.example"}), "defer", 1000,
                           {"alpha@asso.example": 2})

    assert [ask("alpha@asso.example", n) for n in range(3)][2].startswith("450 4.7.1")
    assert all(ask("bravo@asso.example", n) == "DUNNO" for n in range(5))


def test_the_recipients_service_reads_its_per_sender_limits(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """--limit SENDER=N, as master.cf passes it: that sender's third new recipient is
    refused, another sender's is not."""
    lines = "".join(f"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username={s}\n"
                    f"recipient=r{n}@far.example\n\n" for s in ("alpha@asso.example", "b@x.org")
                    for n in range(3))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    monkeypatch.setattr("sys.stdout", out)
    assert rcpt.main(["--db", str(tmp_path / "r.sqlite"), "--per-day", "5",
                      "--domain", "asso.example", "--limit", "alpha@asso.example=2"]) == 0
    answers = [a for a in out.getvalue().split("\n") if a]
    assert answers[:2] == ["action=DUNNO"] * 2 and answers[2].startswith("action=450 4.7.1")
    assert answers[3:] == ["action=DUNNO"] * 3


@pytest.mark.parametrize("release", RELEASES)
def test_member_rules_pass_postfwd_and_postconf(release: str, validators: Validators) -> None:
    plan = plan_of(release=release)
    validators.prepare(release, plan)
    for path in (mail.POSTFWD_CF, mail.MASTER_CF):
        f = file_of(plan, path)
        ok = validators.check(release, f.path, f.content, f.validate)
        assert ok.returncode == 0, (f.path, (ok.stdout + ok.stderr).decode())
    f = file_of(plan, mail.POSTFWD_CF)
    broken = f.content.replace("sasl_username==alpha@asso.example;",
                               "sasl_username==alpha@asso.example; bogus", 1)
    assert validators.check(release, f.path, broken, f.validate).returncode != 0
