"""Members' mailboxes (examples/association.yaml): alpha, bravo and charlie each have a mailbox
on the association's mail server, requested by the association module of the mail module,
opened with the member's single login. The IMAP and SMTP clients are Python's imaplib and
smtplib run inside the server (127.0.0.1), the passwords given on standard input (never on a
command line). The TLS certificate is not checked here (the mail scenario checks it): these
checks are about logins, delivery, quotas and permissions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from typing import Any

import pytest

DOMAIN = "asso.example"
PASSWORDS = {
    "alpha": os.environ.get("ASSO_ALPHA_PASSWORD", "molecule: alpha's login, 2026!"),
    "bravo": os.environ.get("ASSO_BRAVO_PASSWORD", "molecule: bravo's login, 2026!"),
    "charlie": os.environ.get("ASSO_CHARLIE_PASSWORD", "molecule: charlie's login, 2026!"),
}
ALPHA_MAILDIR = f"/var/vmail/{DOMAIN}/alpha/Maildir"

# Runs in the server: one action, read as JSON on standard input, result as JSON.
CLIENT = r"""
import imaplib, json, smtplib, ssl, sys
r = json.load(sys.stdin)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out = {}
try:
    if r["do"] == "imap":
        m = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx, timeout=15)
        m.login(r["user"], r["password"])
        m.select("INBOX", readonly=True)
        typ, data = m.search(None, "HEADER", "Subject", '"' + r["subject"] + '"')
        out["messages"] = []
        for i in data[0].split():
            typ, msg = m.fetch(i, "(RFC822)")
            out["messages"].append(msg[0][1].decode("utf-8", "replace"))
        m.logout()
    elif r["do"] == "smtp":
        s = smtplib.SMTP("127.0.0.1", 587, timeout=30)
        s.starttls(context=ctx)
        s.login(r["user"], r["password"])
        refused = s.sendmail(r["from"], r["to"], r["message"].encode())
        out["result"] = ["ok", {k: [v[0], v[1].decode()] for k, v in refused.items()}]
        s.quit()
except (OSError, smtplib.SMTPException, imaplib.IMAP4.error) as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def client(host: Any) -> Any:
    name = str(host.backend.name)

    def act(**req: Any) -> dict[str, Any]:
        res = subprocess.run(["podman", "exec", "-i", name, "python3", "-c", CLIENT],
                             input=json.dumps(req), capture_output=True, text=True,
                             timeout=120, check=True)
        return dict(json.loads(res.stdout))

    return act


def imap(client: Any, member: str, subject: str, password: str | None = None) -> Any:
    return client(do="imap", user=f"{member}@{DOMAIN}",
                  password=PASSWORDS[member] if password is None else password,
                  subject=subject)


def wait_for(client: Any, member: str, subject: str, timeout: float = 60,
             containing: str = "") -> list[str]:
    """The member's messages with ``subject`` once one of them contains ``containing`` (or
    at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        res = imap(client, member, subject)
        assert "error" not in res, res
        if (any(containing in m for m in res["messages"])
                or time.monotonic() > deadline):
            return list(res["messages"])
        time.sleep(1)


def message(sender: str, to: str, subject: str, body: str = "Hello.\r\n") -> str:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@asso.test>\r\n\r\n{body}")


def test_each_member_logs_in_over_imaps_with_its_single_login(client: Any) -> None:
    for member in PASSWORDS:
        assert imap(client, member, "nothing") == {"messages": []}, member
    res = imap(client, "alpha", "nothing", password=PASSWORDS["bravo"])
    assert "AUTHENTICATIONFAILED" in res.get("error", ""), res


def test_mail_to_a_members_alias_reaches_its_maildir(host: Any, client: Any) -> None:
    """Bravo's login submits (587) to alpha's alias; alpha reads it over IMAP."""
    subject = f"To alpha's alias {uuid.uuid4()}"
    res = client(do="smtp", user=f"bravo@{DOMAIN}", password=PASSWORDS["bravo"],
                 **{"from": f"bravo@{DOMAIN}", "to": [f"webmaster-alpha@{DOMAIN}"],
                    "message": message(f"bravo@{DOMAIN}", f"webmaster-alpha@{DOMAIN}",
                                       subject)})
    assert res.get("result") == ["ok", {}], res
    msgs = wait_for(client, "alpha", subject)
    assert len(msgs) == 1, msgs
    assert re.search(r"^Delivered-To: <?alpha@asso\.example>?\r?$", msgs[0], re.M), msgs
    found = host.run(f"grep -rl {subject.split()[-1]} {ALPHA_MAILDIR}")
    assert found.rc == 0 and ALPHA_MAILDIR in found.stdout


def test_a_member_over_its_mail_quota_is_refused(host: Any, client: Any) -> None:
    """Charlie's plan gives 1 MB: a 2 MB message is refused by Dovecot ("Quota exceeded")
    and bounced to its sender, alpha."""
    subject = f"Too big for charlie {uuid.uuid4()}"
    body = ("x" * 76 + "\r\n") * 27000  # about 2 MB
    res = client(do="smtp", user=f"alpha@{DOMAIN}", password=PASSWORDS["alpha"],
                 **{"from": f"alpha@{DOMAIN}", "to": [f"charlie@{DOMAIN}"],
                    "message": message(f"alpha@{DOMAIN}", f"charlie@{DOMAIN}", subject, body)})
    assert res.get("result") == ["ok", {}], res
    bounce = wait_for(client, "alpha", "Undelivered Mail", containing=subject)
    assert any("Quota exceeded" in b and subject in b for b in bounce), bounce
    assert wait_for(client, "charlie", subject, timeout=1) == []


def test_another_member_cannot_read_a_members_maildir(host: Any) -> None:
    assert host.run(f"runuser -u vmail -- ls {ALPHA_MAILDIR}/new").rc == 0  # it exists
    res = host.run(f"runuser -u bravo -- ls {ALPHA_MAILDIR}/new")
    assert res.rc != 0 and "Permission denied" in res.stderr, res.stderr


def test_each_members_maildir_is_a_backup_source_of_its_own(host: Any) -> None:
    """The member's Maildir is backed up as the association's (restored with that member's
    data), never also as part of the mail service's /var/vmail."""
    owners = host.file("/etc/selfhost/backup/services.txt").content_string.splitlines()
    for member in PASSWORDS:
        assert f"association\t/var/vmail/{DOMAIN}/{member}" in owners, owners
    assert "mail\t/var/vmail" not in owners, owners
