"""The backupmx scenario: a mail server and its backup MX on a friend's host, checked with
Python's smtplib over the pair's internal test network.

The SMTP client runs in the primary's container (to the backup it is just another host of the
internet: not in its mynetworks). With the primary's Postfix stopped, the backup accepts mail
for an existing address (and its +extension) and queues it; it refuses an unknown address at
RCPT time, relaying to a foreign domain, and a forged sender of the domain. Once the primary
is back and the backup's queue flushed, the message is in the Maildir, handed over with TLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parents[1]
CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"

# Runs in the primary's container: one SMTP conversation, read as JSON on standard input,
# result as JSON on standard output (each recipient's reply, the server's STARTTLS result).
CLIENT = r"""
import json, smtplib, ssl, sys
r = json.load(sys.stdin)
out = {}
try:
    s = smtplib.SMTP(r["host"], 25, timeout=20)
    s.ehlo("client.example.net")
    out["starttls_offered"] = s.has_extn("starttls")
    if r.get("cafile"):
        s.starttls(context=ssl.create_default_context(cafile=r["cafile"]))
        s.ehlo("client.example.net")
        out["tls"] = s.sock.version()
    code, msg = s.mail(r["from"])
    out["mail"] = [code, msg.decode()]
    out["rcpt"] = {}
    for to in r["to"]:
        code, msg = s.rcpt(to)
        out["rcpt"][to] = [code, msg.decode()]
    if any(v[0] == 250 for v in out["rcpt"].values()):
        code, msg = s.data(r["message"].encode())
        out["data"] = [code, msg.decode()]
    s.quit()
except (OSError, smtplib.SMTPException) as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def platform(name: str) -> dict[str, Any]:
    platforms = yaml.safe_load((HERE / "molecule.yml").read_text())["platforms"]
    return dict(next(p for p in platforms if p["name"] == name))


def podman(*args: str, stdin: str | None = None, check: bool = True) -> str:
    res = subprocess.run(["podman", *args], input=stdin, capture_output=True, text=True,
                         timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {res.stdout}{res.stderr}")
    return res.stdout


@pytest.fixture(scope="module")
def pair(host: Any) -> dict[str, str]:
    """The primary's and the backup's containers and names, and the mail domain."""
    mx = str(host.backend.name)
    backup = platform(mx)["peer"]
    fleet = yaml.safe_load((HERE / "fleet.yaml").read_text())
    domain = fleet["hosts"][platform(mx)["host"]]["services"]["mail"]["domains"][0]["name"]
    return {"mx": mx, "backup": backup, "domain": domain,
            "mx_name": platform(mx)["fqdn"], "backup_name": platform(backup)["fqdn"]}


def smtp(pair: dict[str, str], **req: Any) -> dict[str, Any]:
    """One SMTP conversation from the primary's container to the backup MX on port 25."""
    req.setdefault("host", pair["backup_name"])
    out = podman("exec", "-i", pair["mx"], "python3", "-c", CLIENT, stdin=json.dumps(req))
    return dict(json.loads(out))


def message(sender: str, to: str, subject: str) -> str:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.net>\r\n\r\nKept by the backup MX.\r\n")


def sh(container: str, script: str, check: bool = True) -> str:
    return podman("exec", container, "sh", "-c", script, check=check)


def test_the_backup_is_a_relay_without_mailboxes(pair: dict[str, str]) -> None:
    b = pair["backup"]
    assert sh(b, "systemctl is-active postfix").strip() == "active"
    assert sh(b, "postconf -h relay_domains").strip() == pair["domain"]
    assert sh(b, "postconf -h maximal_queue_lifetime").strip() == "10d"
    assert "virtual_mailbox" not in sh(b, "postconf -n")  # no mailboxes stored here
    installed = sh(b, "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n' 'dovecot*' "
                   "2>/dev/null", check=False)
    assert not [p for p in installed.splitlines() if p.startswith("ii")], installed
    listening = sh(b, "ss -Hltn")
    assert ":25 " in listening and ":993 " not in listening and ":587 " not in listening


def test_the_backup_offers_starttls_with_its_certificate(pair: dict[str, str]) -> None:
    """Once Caddy's CA on the backup has issued its certificate (the export runs 30 s after
    the deploy: started here), a client that trusts only that CA gets TLS 1.2 or later."""
    b = pair["backup"]
    cert = f"/etc/selfhost/tls/{pair['backup_name']}/fullchain.pem"
    deadline = time.monotonic() + 90
    while True:
        sh(b, "systemctl start selfhost-cert-export.service", check=False)
        ok = sh(b, f"test -s {CA} && openssl verify -CAfile {CA} -untrusted {cert} {cert} "
                "&& echo verified", check=False)
        if "verified" in ok:
            break
        assert time.monotonic() < deadline, ok
        time.sleep(2)
    podman("exec", "-i", pair["mx"], "sh", "-c", "cat > /tmp/backup-ca.crt",
           stdin=podman("exec", b, "cat", CA))
    res = smtp(pair, cafile="/tmp/backup-ca.crt",
               **{"from": "friend@example.net", "to": [], "message": ""})
    assert res.get("starttls_offered") is True, res
    assert res.get("tls") in ("TLSv1.2", "TLSv1.3"), res


def test_mail_waits_on_the_backup_and_reaches_the_mailbox(pair: dict[str, str]) -> None:
    mx, backup, domain = pair["mx"], pair["backup"], pair["domain"]
    alice = f"alice@{domain}"
    subject = f"Kept by the backup {uuid.uuid4()}"
    maildir = f"/var/vmail/{domain}/alice/Maildir"
    sh(mx, "systemctl stop postfix")
    try:
        # Accepted for an existing address (and its +extension), and queued.
        res = smtp(pair, **{"from": "friend@example.net",
                            "to": [alice, f"alice+lists@{domain}"],
                            "message": message("friend@example.net", alice, subject)})
        assert res["rcpt"] == {alice: [250, "2.1.5 Ok"],
                               f"alice+lists@{domain}": [250, "2.1.5 Ok"]}, res
        assert res["data"][0] == 250, res
        # Refused at RCPT: an unknown address (no bounce later: no backscatter).
        res = smtp(pair, **{"from": "friend@example.net", "to": [f"nobody@{domain}"],
                            "message": "x"})
        code, text = res["rcpt"][f"nobody@{domain}"]
        assert code == 550 and "User unknown in relay recipient table" in text, res
        # Refused: relaying to a foreign domain.
        res = smtp(pair, **{"from": "friend@example.net", "to": ["someone@example.com"],
                            "message": "x"})
        code, text = res["rcpt"]["someone@example.com"]
        assert code == 554 and "Relay access denied" in text, res
        # Refused: the domain's own address as a sender from outside.
        res = smtp(pair, **{"from": f"alice@{domain}", "to": [alice], "message": "x"})
        code, text = res["rcpt"][alice]
        assert code == 554 and "sent through its own server" in text, res
        queue = sh(backup, "postqueue -j")
        entries = [json.loads(line) for line in queue.splitlines() if line.strip()]
        mine = [e for e in entries
                if {r["address"] for r in e["recipients"]} == {alice, f"alice+lists@{domain}"}]
        assert len(mine) == 1 and mine[0]["sender"] == "friend@example.net", entries
        assert mine[0]["queue_name"] == "deferred", mine
        assert subject not in sh(mx, f"cat {maildir}/new/* {maildir}/cur/* 2>/dev/null || true")
    finally:
        sh(mx, "systemctl start postfix")
    sh(backup, "postqueue -f")
    deadline = time.monotonic() + 60
    while True:
        found = sh(mx, f"grep -l -r -F '{subject}' {maildir} || true").split()
        if (found and not sh(backup, "postqueue -j").strip()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert found, sh(backup, "postqueue -p")
    delivered = sh(mx, f"cat {found[0]}")
    # Handed over by the backup, over TLS (ESMTPS), to the primary.
    assert f"from {pair['backup_name']}" in delivered and "with ESMTPS" in delivered, delivered
    assert sh(backup, "postqueue -j").strip() == "", sh(backup, "postqueue -p")


# Runs in the primary's container: submissions on 587 (STARTTLS, login), one connection per
# message; each result is "ok" or the SMTP error's code and text.
SUBMIT = r"""
import json, smtplib, ssl, sys
r = json.load(sys.stdin)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # the limits are the point here, not the certificate
out = []
for subject in r["subjects"]:
    try:
        s = smtplib.SMTP("127.0.0.1", 587, timeout=20)
        s.starttls(context=ctx)
        s.login(r["user"], r["password"])
        msg = f"From: {r['user']}\r\nTo: {r['to']}\r\nSubject: {subject}\r\n\r\nburst\r\n"
        s.sendmail(r["user"], [r["to"]], msg.encode())
        out.append(["ok"])
        s.quit()
    except smtplib.SMTPResponseException as e:
        out.append([e.smtp_code, e.smtp_error.decode()])
print(json.dumps(out))
"""


def submit(pair: dict[str, str], user: str, password: str, count: int) -> list[list[Any]]:
    req = {"user": f"{user}@{pair['domain']}", "password": password,
           "to": f"bob@{pair['domain']}",
           "subjects": [f"Burst {user} {i} {uuid.uuid4()}" for i in range(count)]}
    out = podman("exec", "-i", pair["mx"], "python3", "-c", SUBMIT, stdin=json.dumps(req))
    return list(json.loads(out))


def test_a_burst_from_one_user_is_deferred_and_the_admin_alerted(pair: dict[str, str]) -> None:
    """The primary allows 3 messages a minute per login (fleet.yaml): Alice's fourth is
    deferred with a 4xx (her mail program keeps it), Bob's mail still goes, and the alert
    timer's service mails root (the admin) who reached the limit."""
    mx = pair["mx"]
    alice = os.environ["MAIL_ALICE_PASSWORD"]
    bob = os.environ["MAIL_BOB_PASSWORD"]
    res = submit(pair, "alice", alice, 4)
    assert res[:3] == [["ok"]] * 3, res
    code, text = res[3]
    assert code == 450 and f"Outbound limit: alice@{pair['domain']} may send 3 per minute" \
        in text, res
    assert submit(pair, "bob", bob, 1) == [["ok"]]
    sh(mx, "systemctl start selfhost-mail-limits.service")
    assert f"alice@{pair['domain']}" in sh(
        mx, "journalctl -t selfhost-mail-limits -o cat --no-pager")
    deadline = time.monotonic() + 30
    while "outbound limit reached" not in sh(mx, "cat /var/mail/root 2>/dev/null || true"):
        assert time.monotonic() < deadline, sh(mx, "postqueue -p")
        time.sleep(1)
    assert f"alice@{pair['domain']}" in sh(mx, "cat /var/mail/root")
