"""The mail server, checked with real clients.

The client is a second container on an internal network that this scenario created (the
server at .2, the client at .3, the name nas.home.arpa pointing at the server): it speaks
SMTP and IMAP over TLS with Python's smtplib and imaplib, trusting only Caddy's internal CA
(the certificate comes through the web module's certificate export). DKIM signatures are
checked on the controller by dkimpy, an independent implementation, against the public key
read from the server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from typing import Any

import dkim
import pytest

NAME = "nas.home.arpa"
CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
TLS = f"/etc/selfhost/tls/{NAME}"
ALICE = os.environ.get("MAIL_ALICE_PASSWORD", "molecule: Alice's mail password, 2026!")
BOB = os.environ.get("MAIL_BOB_PASSWORD", "molecule: Bob's mail password, 2026!")

# Runs in the client container: one action, read as JSON on standard input (passwords never
# travel in a command line), result as JSON on standard output.
CLIENT = r"""
import imaplib, json, smtplib, socket, ssl, sys
r = json.load(sys.stdin)
ctx = ssl.create_default_context(cafile="/tmp/selfhost-ca.crt")
out = {}
try:
    if r["do"] == "smtp":
        if r["port"] == 465:
            s = smtplib.SMTP_SSL(r["host"], 465, context=ctx, timeout=15)
        else:
            s = smtplib.SMTP(r["host"], r["port"], timeout=15)
        s.ehlo("client.test")
        out["auth_before_tls"] = s.has_extn("auth")
        if r.get("try_auth_before_tls"):
            code, msg = s.docmd("AUTH", "PLAIN AGZvbwBiYXI=")
            out["auth_plain_reply"] = [code, msg.decode()]
        if r.get("starttls"):
            s.starttls(context=ctx)
            s.ehlo("client.test")
        if r.get("user"):
            s.login(r["user"], r["password"])
        try:
            refused = s.sendmail(r["from"], r["to"], r["message"].encode())
            out["result"] = ["ok", {k: [v[0], v[1].decode()] for k, v in refused.items()}]
        except smtplib.SMTPRecipientsRefused as e:
            out["result"] = ["recipients-refused",
                             {k: [v[0], v[1].decode()] for k, v in e.recipients.items()}]
        except smtplib.SMTPSenderRefused as e:
            out["result"] = ["sender-refused", [e.smtp_code, e.smtp_error.decode()]]
        s.quit()
    elif r["do"] == "imap":
        m = imaplib.IMAP4_SSL(r["host"], 993, ssl_context=ctx, timeout=15)
        m.login(r["user"], r["password"])
        m.select(r.get("mailbox", "INBOX"), readonly=True)
        typ, data = m.search(None, "HEADER", "Subject", '"' + r["subject"] + '"')
        ids = data[0].split()
        out["messages"] = []
        for i in ids:
            typ, msg = m.fetch(i, "(RFC822)")
            out["messages"].append(msg[0][1].decode("utf-8", "replace"))
        m.logout()
    elif r["do"] == "connect":
        s = socket.create_connection((r["host"], r["port"]), timeout=8)
        s.close()
        out["connected"] = True
except (OSError, smtplib.SMTPException, imaplib.IMAP4.error) as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def podman(*args: str, stdin: str | None = None, check: bool = True) -> str:
    res = subprocess.run(["podman", *args], input=stdin, capture_output=True, text=True,
                         timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {res.stderr}")
    return res.stdout


@pytest.fixture(scope="module")
def names(host: Any) -> tuple[str, str]:
    server = str(host.backend.name)
    return server, f"{server}-client"


@pytest.fixture(scope="module")
def client(host: Any, names: tuple[str, str]) -> Any:
    """An action function of the client container, once the server's certificate is the one
    Caddy's internal CA issued (the export runs 30 s after the deploy: started here)."""
    server, cont = names
    deadline = time.monotonic() + 90
    while True:
        host.run("systemctl start selfhost-cert-export.service")
        ok = host.run(f"test -s {CA} && openssl verify -CAfile {CA} -untrusted "
                      f"{TLS}/fullchain.pem {TLS}/fullchain.pem")
        if ok.rc == 0:
            break
        assert time.monotonic() < deadline, ok.stdout + ok.stderr + host.run(
            "journalctl -u selfhost-cert-export -n 20 --no-pager").stdout
        time.sleep(2)
    podman("exec", "-i", cont, "sh", "-c", "cat > /tmp/selfhost-ca.crt",
           stdin=podman("exec", server, "cat", CA))

    def act(**req: Any) -> dict[str, Any]:
        req.setdefault("host", NAME)
        out = podman("exec", "-i", cont, "python3", "-c", CLIENT, stdin=json.dumps(req))
        return dict(json.loads(out))

    return act


def message(sender: str, to: str, subject: str, body: str = "Hello from the test.\r\n",
            extra: str = "") -> str:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@client.test>\r\nUser-Agent: SecretClient/9.9\r\n"
            f"{extra}\r\n{body}")


def wait_for(client: Any, user: str, password: str, subject: str,
             timeout: float = 30, mailbox: str = "INBOX") -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        res = client(do="imap", user=user, password=password, subject=subject, mailbox=mailbox)
        assert "error" not in res, res
        if res["messages"] or time.monotonic() > deadline:
            return list(res["messages"])
        time.sleep(1)


def dkim_record(host: Any, selector: str) -> bytes:
    """The TXT record of the selector, from the key file opendkim-genkey wrote on the
    server."""
    text = host.check_output(f"cat /etc/opendkim/keys/home.arpa/{selector}.txt")
    return "".join(re.findall(r'"([^"]*)"', text)).encode()


def test_daemons_run_and_only_the_model_ports_listen(host: Any) -> None:
    for unit in ("postfix", "dovecot", "opendkim"):
        assert host.service(unit).is_running and host.service(unit).is_enabled, unit
    listening = host.check_output("ss -Hltn")
    for port in (25, 465, 587, 993):
        assert f":{port} " in listening, port
    assert ":143 " not in listening and ":110 " not in listening
    # OpenDKIM answers Postfix on a Unix socket in Postfix's chroot, no TCP port at all.
    assert ":8891 " not in listening
    sock = host.file("/var/spool/postfix/opendkim/opendkim.sock")
    assert sock.is_socket and sock.user == "opendkim" and sock.group == "postfix"


def test_submission_delivered_signed_and_read_over_imap(host: Any, client: Any) -> None:
    """Alice submits on 587 (STARTTLS, then login); Bob reads it over IMAPS; the DKIM
    signature verifies with dkimpy against the key on the server; the client's address and
    program are not in the delivered headers."""
    subject = f"Submission test {uuid.uuid4()}"
    res = client(do="smtp", port=587, starttls=True, user="alice@home.arpa", password=ALICE,
                 **{"from": "alice@home.arpa", "to": ["bob@home.arpa"],
                    "message": message("alice@home.arpa", "bob@home.arpa", subject)})
    assert res.get("result") == ["ok", {}], res
    msgs = wait_for(client, "bob@home.arpa", BOB, subject)
    assert len(msgs) == 1, msgs
    raw = msgs[0].replace("\r\n", "\n").replace("\n", "\r\n").encode()
    assert b"DKIM-Signature:" in raw and b"s=s2026" in raw
    record = dkim_record(host, "s2026")
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: record
                       if name.startswith(b"s2026._domainkey.home.arpa") else b"")
    # The signature fails with another key (the rotation selector's): the check can fail.
    other = dkim_record(host, "s2025")
    assert not dkim.verify(raw, dnsfunc=lambda name, timeout=5: other)
    assert "SecretClient" not in msgs[0]
    platforms_client_ip = ".3"
    assert not re.search(r"\[10\.213\.\d+" + re.escape(platforms_client_ip), msgs[0]), msgs[0]


def test_implicit_tls_submission_on_465(client: Any) -> None:
    subject = f"Port 465 test {uuid.uuid4()}"
    res = client(do="smtp", port=465, user="bob@home.arpa", password=BOB,
                 **{"from": "bob@home.arpa", "to": ["family@home.arpa"],
                    "message": message("bob@home.arpa", "family@home.arpa", subject)})
    assert res.get("result") == ["ok", {}], res
    assert len(wait_for(client, "alice@home.arpa", ALICE, subject)) == 1


def test_mail_from_outside_for_a_mailbox_is_accepted_on_25(client: Any) -> None:
    subject = f"Inbound test {uuid.uuid4()}"
    res = client(do="smtp", port=25, starttls=True,
                 **{"from": "friend@example.net", "to": ["alice@home.arpa"],
                    "message": message("friend@example.net", "alice@home.arpa", subject)})
    assert res.get("result") == ["ok", {}], res
    assert len(wait_for(client, "alice@home.arpa", ALICE, subject)) == 1


def test_refused_relay_unknown_recipient_and_no_auth_on_25(client: Any) -> None:
    res = client(do="smtp", port=25, starttls=True,
                 **{"from": "friend@example.net", "to": ["someone@example.com"],
                    "message": message("friend@example.net", "someone@example.com", "relay")})
    assert res["result"][0] == "recipients-refused", res
    code, text = res["result"][1]["someone@example.com"]
    assert code == 554 and "Relay access denied" in text, res
    res = client(do="smtp", port=25, starttls=True,
                 **{"from": "friend@example.net", "to": ["nobody@home.arpa"],
                    "message": message("friend@example.net", "nobody@home.arpa", "unknown")})
    assert res["result"][0] == "recipients-refused", res
    assert res["result"][1]["nobody@home.arpa"][0] == 550, res
    # Nobody logs in on port 25, and nobody outside may use a local sender.
    res = client(do="smtp", port=25, starttls=True, user="alice@home.arpa", password=ALICE,
                 **{"from": "alice@home.arpa", "to": ["bob@home.arpa"], "message": "x"})
    assert "SMTPNotSupportedError" in res.get("error", ""), res
    res = client(do="smtp", port=25, starttls=True,
                 **{"from": "alice@home.arpa", "to": ["bob@home.arpa"],
                    "message": message("alice@home.arpa", "bob@home.arpa", "spoof")})
    assert res["result"][0] in ("sender-refused", "recipients-refused"), res
    assert "is sent after logging in" in json.dumps(res["result"][1]), res


def test_no_auth_before_starttls_on_587(client: Any) -> None:
    res = client(do="smtp", port=587, try_auth_before_tls=True,
                 **{"from": "alice@home.arpa", "to": ["bob@home.arpa"], "message": "x"})
    assert res["auth_before_tls"] is False, res
    code, text = res["auth_plain_reply"]
    assert code == 530 and "STARTTLS" in text, res


def test_forged_sender_on_submission_is_refused(client: Any) -> None:
    res = client(do="smtp", port=587, starttls=True, user="bob@home.arpa", password=BOB,
                 **{"from": "alice@home.arpa", "to": ["alice@home.arpa"],
                    "message": message("alice@home.arpa", "alice@home.arpa", "forged")})
    assert res["result"][0] in ("sender-refused", "recipients-refused"), res
    assert "not owned by user bob@home.arpa" in json.dumps(res["result"][1]), res


def test_wrong_password_is_refused(client: Any) -> None:
    res = client(do="imap", user="alice@home.arpa", password="not the password", subject="x")
    assert "AUTHENTICATIONFAILED" in res.get("error", "") or "failed" in res.get("error", ""), res


def test_plaintext_imap_is_closed(host: Any, client: Any) -> None:
    """Nothing listens on 143, even behind the firewall (which drops it from outside)."""
    probe = host.run("python3 -c \"import socket; socket.create_connection(('127.0.0.1', "
                     "143), timeout=5)\"")
    assert probe.rc != 0 and "ConnectionRefusedError" in probe.stderr, probe.stderr
    res = client(do="connect", port=143)
    assert "ConnectionRefusedError" in res.get("error", "") or \
        "TimeoutError" in res.get("error", ""), res
    assert client(do="connect", port=993).get("connected") is True


def test_over_quota_message_is_bounced_and_nothing_is_lost(host: Any, client: Any) -> None:
    """Bob's mailbox holds 1 MB: a 2 MB message is refused by Dovecot (LMTP 552) and bounced
    to Alice with Dovecot's message; what Bob had stays."""
    first = f"Before quota {uuid.uuid4()}"
    res = client(do="smtp", port=587, starttls=True, user="alice@home.arpa", password=ALICE,
                 **{"from": "alice@home.arpa", "to": ["bob@home.arpa"],
                    "message": message("alice@home.arpa", "bob@home.arpa", first)})
    assert res.get("result") == ["ok", {}], res
    assert len(wait_for(client, "bob@home.arpa", BOB, first)) == 1
    big = f"Too big {uuid.uuid4()}"
    body = ("x" * 76 + "\r\n") * 27000  # about 2 MB
    res = client(do="smtp", port=587, starttls=True, user="alice@home.arpa", password=ALICE,
                 **{"from": "alice@home.arpa", "to": ["bob@home.arpa"],
                    "message": message("alice@home.arpa", "bob@home.arpa", big, body)})
    assert res.get("result") == ["ok", {}], res
    bounce = wait_for(client, "alice@home.arpa", ALICE, "Undelivered Mail")
    assert any("Quota exceeded" in b and big in b for b in bounce), bounce
    assert wait_for(client, "bob@home.arpa", BOB, big, timeout=1) == []
    assert len(wait_for(client, "bob@home.arpa", BOB, first)) == 1


def test_local_sendmail_goes_through_postfix(host: Any, client: Any) -> None:
    """Postfix is the system's sendmail: a local program's mail is delivered (and signed)."""
    subject = f"Local sendmail {uuid.uuid4()}"
    res = host.run(f"printf 'From: postmaster@home.arpa\\nTo: alice@home.arpa\\nSubject: "
                   f"{subject}\\n\\nfrom cron\\n' | /usr/sbin/sendmail -f postmaster@home.arpa "
                   "alice@home.arpa")
    assert res.rc == 0, res.stderr
    assert not host.package("msmtp-mta").is_installed
    msgs = wait_for(client, "alice@home.arpa", ALICE, subject)
    assert len(msgs) == 1 and "DKIM-Signature:" in msgs[0]


SIEVE = """require ["fileinto", "mailbox"];
if header :contains "subject" "[club]" {
  fileinto :create "Club";
}
"""


def test_the_users_sieve_filter_files_mail(client: Any, names: tuple[str, str]) -> None:
    """A Sieve script in Alice's home (as a ManageSieve client or the admin would put it):
    LMTP delivery runs it, and the message lands in the folder it names."""
    home = "/var/vmail/home.arpa/alice"
    podman("exec", "-i", names[0], "runuser", "-u", "vmail", "--", "sh", "-c",
           f"mkdir -p {home}/sieve && cat > {home}/sieve/club.sieve && "
           f"ln -sfn sieve/club.sieve {home}/.dovecot.sieve", stdin=SIEVE)
    subject = f"[club] Meeting {uuid.uuid4()}"
    res2 = client(do="smtp", port=25, starttls=True,
                  **{"from": "friend@example.net", "to": ["alice@home.arpa"],
                     "message": message("friend@example.net", "alice@home.arpa", subject)})
    assert res2.get("result") == ["ok", {}], res2
    assert len(wait_for(client, "alice@home.arpa", ALICE, subject, mailbox="Club")) == 1
    assert wait_for(client, "alice@home.arpa", ALICE, subject, timeout=1) == []


def relay_mailbox(subject: str, timeout: float = 40) -> str:
    """Carol's mailbox on the smarthost (relay.sh), once it holds ``subject``."""
    deadline = time.monotonic() + timeout
    while True:
        box = podman("exec", "m11-mail-relay", "sh", "-c", "cat /var/mail/carol 2>/dev/null",
                     check=False)
        if subject in box or time.monotonic() > deadline:
            return box
        time.sleep(1)


def test_outgoing_mail_leaves_through_the_smarthost_over_tls_with_a_login(
        host: Any, client: Any) -> None:
    """services.mail.relay: mail for another domain goes to the smarthost (which requires
    STARTTLS and AUTH on 587, its certificate checked), logged in with the password from the
    root-only table; the password is in no file but that one."""
    subject = f"Smarthost test {uuid.uuid4()}"
    res = client(do="smtp", port=587, starttls=True, user="alice@home.arpa", password=ALICE,
                 **{"from": "alice@home.arpa", "to": ["carol@relay.test"],
                    "message": message("alice@home.arpa", "carol@relay.test", subject)})
    assert res.get("result") == ["ok", {}], res
    box = relay_mailbox(subject)
    assert subject in box, box + host.run("journalctl -n 30 --no-pager -o cat "
                                          "SYSLOG_IDENTIFIER=postfix/smtp").stdout
    assert "DKIM-Signature:" in box
    log = host.check_output("journalctl --no-pager -o cat SYSLOG_IDENTIFIER=postfix/smtp")
    assert re.search(r"to=<carol@relay\.test>, relay=relay\.test\[10\.213\.113\.2\]:587,.*"
                     r"status=sent", log), log
    # The TLS policy of the smarthost is "secure": Postfix sends nothing over a connection
    # whose certificate or name it could not verify, so "status=sent" above implies both
    # (it logs "Verified TLS connection" only with smtp_tls_loglevel >= 1, not set here).
    assert host.check_output("cat /etc/postfix/selfhost-smarthost-tls").endswith(
        "[relay.test]:587 secure")
    relay_log = podman("exec", "m11-mail-relay", "journalctl", "--no-pager", "-o", "cat",
                       "SYSLOG_IDENTIFIER=postfix/submission/smtpd")
    assert "sasl_method=PLAIN, sasl_username=nas" in relay_log or \
        "sasl_username=nas" in relay_log, relay_log
    table = host.file("/etc/postfix/selfhost-smarthost-password")
    assert table.user == "root" and table.mode == 0o600
    password = os.environ.get("MAIL_RELAY_PASSWORD", "molecule smarthost's password, 2026!")
    assert host.run(f"grep -rlF -- {password!r} /etc /var/lib/selfhost").stdout.split() == \
        ["/etc/postfix/selfhost-smarthost-password"]


def test_the_authoritative_zone_carries_the_dkim_key_opendkim_signs_with(host: Any) -> None:
    """Knot on the same host serves home.arpa: its DKIM record is the key opendkim-genkey made
    here (not a placeholder): the public half of the private key OpenDKIM signs with."""
    for selector in ("s2026", "s2025"):
        deadline = time.monotonic() + 30
        while True:
            out = host.run(f"kdig @127.0.0.1 +short TXT {selector}._domainkey.home.arpa")
            got = "".join(re.findall(r'"([^"]*)"', out.stdout)).encode()
            if got or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert got == dkim_record(host, selector), (selector, out.stdout, out.stderr)
        assert b"p=MII" in got
        # The public half of the private key OpenDKIM signs with (key.table names it).
        key = host.check_output(f"openssl rsa -in /etc/opendkim/keys/home.arpa/{selector}"
                                ".private -pubout -outform DER 2>/dev/null | base64 -w0")
        assert got.decode().split("p=", 1)[1] == key, selector
    assert "s2026._domainkey.home.arpa home.arpa:s2026:/etc/opendkim/keys/home.arpa/" \
        "s2026.private" in host.file("/etc/opendkim/key.table").content_string


def test_journal_has_no_error_from_the_mail_daemons(host: Any) -> None:
    """Runs after the others. Warnings and errors that postfix, dovecot and opendkim logged
    since boot (their own messages, not systemd's about their units). Accepted: Dovecot's
    notes that it was reloaded (SIGHUP, logged as a warning by design) and that its
    processes (master, log) were stopped by systemd (the packages' own restarts while they
    are installed)."""
    out = host.check_output("journalctl -b --no-pager -o json -p warning")
    benign = re.compile(r"^(master: Warning: SIGHUP received - reloading configuration|"
                        r"[a-z-]+(\(\d+\))?: Warning: Killed with signal 15 )")
    lines = []
    for row in out.splitlines():
        entry = json.loads(row)
        ident = str(entry.get("SYSLOG_IDENTIFIER", ""))
        text = entry.get("MESSAGE", "")
        text = text if isinstance(text, str) else repr(text)
        if (ident.startswith("postfix") or ident in ("dovecot", "opendkim")) and \
                not benign.match(text):
            lines.append(f"{ident}: {text}")
    assert lines == [], "\n".join(lines)
