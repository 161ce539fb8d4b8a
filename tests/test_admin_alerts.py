"""Alerts reach every admin (``admins[].email`` besides ``notify.email``), and the alert for a
member's held mail names the member, the site and the script (from PHP's mail.log)."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from limits_stub import limits_script
from pydantic import ValidationError

from selfhost.compile import Target, compile_fleet
from selfhost.models.fleet import Fleet
from selfhost.services import mail
from selfhost.services.association import pool_file
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
NOTIFY = {"email": "alice@example.org",
          "smtp": {"host": "smtp.example.org", "user": "nas@example.org",
                   "password": {"env": "SMTP_PASSWORD"}}}


def example(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / name).read_text()))


def files(data: dict[str, Any], release: str = "trixie") -> dict[str, str]:
    server = validated(data)
    [plan] = compile_fleet(Fleet.of(server),
                           {server.hostname: Target(release=release, in_container=True)}
                           ).values()
    return dict(plan.files())


def test_roots_mail_goes_to_every_admin_and_notify() -> None:
    data = example("association.yaml")
    aliases = files(data)[mail.ALIASES]
    assert ("root@asso.asso.example antoine@asso.asso.example, beatrice@beatrice.example\n"
            in aliases)
    assert "postmaster@asso.asso.example antoine@asso.asso.example, " in aliases
    data["notify"] = NOTIFY
    data["admins"][1]["email"] = "Alice@example.org"  # the same address, once
    aliases = files(data)[mail.ALIASES]
    assert ("root@asso.asso.example alice@example.org, antoine@asso.asso.example\n"
            in aliases)


def test_without_admin_emails_roots_mail_stays_local() -> None:
    data = example("association.yaml")
    for a in data["admins"]:
        del a["email"]
    assert "root@" not in files(data)[mail.ALIASES]


def test_msmtp_sends_roots_mail_to_every_admin() -> None:
    data = example("home.yaml")
    data["notify"] = NOTIFY
    data["admins"][0]["email"] = "admin@example.net"
    assert files(data)["/etc/selfhost/mail-aliases"].endswith(
        "default: alice@example.org, admin@example.net\n")


@pytest.mark.parametrize(("email", "where"), [
    ("root@asso.asso.example", "admins.0.email: root@asso.asso.example is where root's mail"),
    ("postmaster@asso.asso.example", "admins.0.email: postmaster@"),
])
def test_an_admin_address_that_loops_is_refused(email: str, where: str) -> None:
    data = example("association.yaml")
    data["admins"][0]["email"] = email
    with pytest.raises(ModelError, match=where):
        validated(data)


def test_an_admin_address_must_be_an_address() -> None:
    data = example("association.yaml")
    data["admins"][0]["email"] = "antoine"
    with pytest.raises(ValidationError, match=r"admins\.0\.email"):
        validated(data)


def test_a_send_only_admin_address_is_refused() -> None:
    data = example("mail.yaml")
    send_only = next((m["address"] for m in data["services"]["mail"].get("mailboxes", [])
                      if m.get("send_only")), None)
    if send_only is None:
        pytest.skip("examples/mail.yaml has no send-only account")
    data["admins"][0]["email"] = send_only
    with pytest.raises(ModelError, match=r"admins\.0\.email: .* send-only"):
        validated(data)


def test_an_unreachable_admin_address_is_a_warning_only() -> None:
    from selfhost.validation import validate_fleet

    data = example("home.yaml")
    data.pop("notify", None)
    data["admins"][0]["email"] = "admin@example.net"
    server = validated(copy.deepcopy(data))  # not an error
    problems = validate_fleet(Fleet.of(server))[server.hostname]
    assert any(p.loc == ("admins", 0, "email") and p.severity == "warning"
               and "gets no alert" in p.message for p in problems), problems


def test_member_pools_log_each_mail_call_with_the_script_path() -> None:
    pool = files(example("association.yaml"), "bookworm")[pool_file("8.2", "alpha")]
    assert "php_admin_value[mail.log] = syslog\n" in pool


def test_the_alert_names_the_member_its_site_and_script(tmp_path: Path) -> None:
    """Stand-ins for journalctl (Postfix's hold lines, PHP's mail.log lines), postqueue,
    postcat and getent: the alert's subject names the held login, its body the member, the
    site (from the script's path) and the script; bravo, not held, is not named."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    site = "/srv/members/alpha/sites/alpha.asso.example"
    (tmp_path / "postfix").write_text("".join(
        f"Q{i}: hold: END-OF-MESSAGE from localhost[127.0.0.1]: <localhost[127.0.0.1]>: "
        "Outbound limit: alpha@asso.asso.example may send 10 per minute, held for the admin; "
        "from=<alpha@asso.asso.example>\n" for i in range(3)))
    (tmp_path / "php").write_text("".join(
        f"mail() on [{site}/contact/form.php:4]: To: v{i}@victims.example -- Headers: "
        "X-PHP-Originating-Script: 1001:form.php -- Subject: win\n" for i in range(13))
        + "mail() on [/srv/members/bravo/sites/bravo.example/news.php:2]: To: x@y.example"
        " -- Headers:  -- Subject: news\n")
    (bin_ / "journalctl").write_text(
        "#!/bin/sh\ncase \"$*\" in *SYSLOG_IDENTIFIER=postfix/local-limit/smtpd*) "
        f"cat {tmp_path}/postfix;; *SYSLOG_IDENTIFIER=php*) cat {tmp_path}/php;; esac\n")
    (bin_ / "postqueue").write_text(
        "#!/bin/sh\ncat <<'E'\n-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient---\n"
        + "".join(f"AB12CD3{i}!     412 Mon Nov 30 18:00:00  alpha@asso.asso.example\n"
                  f"                                         v{i}@victims.example\n\n"
                  for i in range(3))
        + "1234ABCD      300 Mon Nov 30 18:00:02  bravo@asso.asso.example\n"
        "                                         x@y.example\n\n-- 1 Kbytes in 4 Requests.\nE\n")
    (bin_ / "postcat").write_text(
        "#!/bin/sh\nprintf 'Subject: x\\nX-PHP-Originating-Script: 1001:form.php\\n'\n")
    (bin_ / "getent").write_text(
        "#!/bin/sh\ncase \"$2\" in alpha) echo 'alpha:x:1001:1001::/srv/members/alpha:"
        "/usr/sbin/nologin';; bravo) echo 'bravo:x:1002:1002::/srv/members/bravo:"
        "/usr/sbin/nologin';; *) exit 2;; esac\n")
    limits_script(tmp_path, bin_, "asso")
    subprocess.run(["sh", str(tmp_path / "run.sh")], env={"PATH": f"{bin_}:/usr/bin:/bin"},
                   check=True)
    sent = (tmp_path / "mail").read_text()
    assert sent.startswith("To: root\nSubject: [asso] mail: outbound limit reached "
                           "(held: alpha)\n"), sent
    assert (f"member alpha, site alpha.asso.example, script {site}/contact/form.php "
            "(13 mail() calls in the last hour)\n") in sent, sent
    assert "3 alpha@asso.asso.example script 1001:form.php" in sent
    assert "member bravo" not in sent and "news.php" not in sent
    assert "held mail sent by: member alpha, site alpha.asso.example" in \
        (tmp_path / "logger").read_text()
