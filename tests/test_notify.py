"""Mail to the admin (notify): model safety, rendered msmtp files, and who uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from selfhost.compile import compile_fleet
from selfhost.compile.compiler import compile_server
from selfhost.compile.plan import File, Packages
from selfhost.compile.target import Target
from selfhost.config import load_fleet
from selfhost.models.server import Server
from selfhost.notify import Notify
from selfhost.validation import ModelError, validated

INVALID = (ValidationError, ModelError)

REPO = Path(__file__).resolve().parents[1]
NOTIFY = {"email": "alice@example.org",
          "smtp": {"host": "smtp.example.org", "user": "nas@example.org",
                   "password": {"env": "SMTP_PASSWORD"}}}


def server(example: str = "home.yaml", **extra: Any) -> Server:
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / example).read_text())
    if "hosts" in data:  # a fleet file: its first host, with the defaults applied
        data = {**data["defaults"], **next(iter(data["hosts"].values()))}
    data.update(extra)
    return validated(data).with_base_dir(REPO / "examples")


def files(s: Server) -> dict[str, File]:
    plan = compile_server(s, Target("bookworm", in_container=True))
    return {st.file.path: st for st in plan.steps if isinstance(st, File)}


def test_without_notify_reports_stay_in_the_journal() -> None:
    f = files(server())
    assert "/etc/msmtprc" not in f
    uu = f["/etc/apt/apt.conf.d/52selfhost-unattended-upgrades"].file.content
    assert 'SyslogEnable "true"' in uu and "Unattended-Upgrade::Mail" not in uu


def test_msmtp_relay_files() -> None:
    s = server(notify=NOTIFY)
    f = files(s)
    rc = f["/etc/msmtprc"].file.content
    for line in ("host smtp.example.org", "port 587", "tls on", "tls_starttls on",
                 "auth on", "user nas@example.org", "from nas@example.org",
                 'passwordeval "cat /etc/selfhost/smtp-password"',
                 "aliases /etc/selfhost/mail-aliases", "account default : selfhost"):
        assert line in rc.splitlines(), line
    assert f["/etc/msmtprc"].file.mode == "0644"  # no secret inside
    pw = f["/etc/selfhost/smtp-password"].file
    assert pw.secret is not None and pw.secret.env == "SMTP_PASSWORD"
    assert (pw.mode, pw.owner, pw.content) == ("0600", "root", "")
    assert f["/etc/selfhost/mail-aliases"].file.content.endswith("default: alice@example.org\n")
    plan = compile_server(s, Target("bookworm"))
    pkgs = next(st for st in plan.steps if isinstance(st, Packages)).names
    assert {"msmtp", "msmtp-mta"} <= set(pkgs)


def test_update_reports_are_mailed() -> None:
    f = files(server(notify=NOTIFY, hardening={"updates": {"mail_report": "only-on-error"}}))
    uu = f["/etc/apt/apt.conf.d/52selfhost-unattended-upgrades"].file.content
    assert 'Unattended-Upgrade::Mail "root";' in uu
    assert 'Unattended-Upgrade::MailReport "only-on-error";' in uu


def test_backup_alerts_are_mailed() -> None:
    """The backup module mails its alerts when a module provides sendmail (here notify)."""
    def nas_files(notify: dict[str, Any] | None) -> dict[str, str]:
        fleet = load_fleet(REPO / "examples" / "backup.yaml")
        if notify is not None:
            fleet.hosts["nas"].notify = Notify.model_validate(notify)
        return compile_fleet(fleet, {"nas": Target("bookworm", in_container=True)},
                             hosts=["nas"])["nas"].files()

    hook = nas_files(NOTIFY)["/etc/selfhost/backup/alert.d/50-mail"]
    assert "/usr/sbin/sendmail -t" in hook
    assert "/etc/selfhost/backup/alert.d/50-mail" not in nas_files(None)


def test_implicit_tls_and_default_sender() -> None:
    rc = files(server(notify={"email": "a@example.org",
                              "smtp": {"host": "mail.example.org", "port": 465, "tls": "tls"}})
               )["/etc/msmtprc"].file.content.splitlines()
    assert "tls_starttls off" in rc and "auth off" in rc
    assert "from root@nas.home.arpa" in rc


def test_local_relay_may_skip_tls() -> None:
    rc = files(server(notify={"email": "a@example.org",
                              "smtp": {"host": "127.0.0.1", "port": 25, "tls": "off"}})
               )["/etc/msmtprc"].file.content.splitlines()
    assert "tls off" in rc


@pytest.mark.parametrize(("smtp", "message"), [
    ({"host": "smtp.example.org", "tls": "off"}, "clear text"),
    ({"host": "smtp.example.org", "user": "x@example.org"}, "both `user` and `password`"),
    ({"host": "smtp.example.org", "password": {"env": "X"}}, "both `user` and `password`"),
    ({"host": "smtp.example.org", "password": "hunter2hunter2", "user": "u"}, "secret"),
])
def test_unsafe_relays_are_refused(smtp: dict[str, Any], message: str) -> None:
    with pytest.raises(INVALID) as err:
        server(notify={"email": "a@example.org", "smtp": smtp})
    text = str(err.value)
    assert "notify.smtp" in text
    assert message in text or "SecretRef" in text or "valid dictionary" in text
    assert "hunter2" not in text


def test_bad_address_is_refused() -> None:
    with pytest.raises(INVALID, match=r"notify\.email"):
        server(notify={**NOTIFY, "email": "alice"})
