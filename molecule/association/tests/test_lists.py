"""Mailing lists (Mailman 3) of examples/association.yaml: member alpha's list
alpha-news@asso.example. Two mailboxes of the association (anna, bruno) subscribe by mail with
their mailbox login (submission on 587, STARTTLS), confirm, and receive a post; a post from a
non-member is held; the archive is private; the list's mail goes out through the mail
server's counted port. Everything runs inside each server (Python's smtplib to 127.0.0.1).
"""

from __future__ import annotations

import os
import re
import shlex
import time
import uuid
from typing import Any

import pytest

LIST = "alpha-news@asso.example"
ANNA = ("anna@asso.example", os.environ.get("ASSO_ANNA_MAIL_PASSWORD", "molecule: anna 2026!"))
BRUNO = ("bruno@asso.example",
         os.environ.get("ASSO_BRUNO_MAIL_PASSWORD", "molecule: bruno 2026!"))
MAILDIR = "/var/vmail/asso.example/{}/Maildir/new"

SEND = r"""
import smtplib, ssl, sys
from email.message import EmailMessage
port, sender, password, to, subject, msgid = sys.argv[1:7]
m = EmailMessage()
m["From"], m["To"], m["Subject"], m["Message-ID"] = sender, to, subject, msgid
m.set_content("Hello from " + sender + "\n")
with smtplib.SMTP("127.0.0.1", int(port), timeout=30) as s:
    s.ehlo("client.test")
    if password:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # loopback test
        s.starttls(context=ctx)
        s.login(sender, password)
    s.send_message(m)
"""

MAILMAN = r"""
import sys
from mailman.core.initialize import initialize
initialize("/etc/mailman3/mailman.cfg")
from mailman.interfaces.listmanager import IListManager
from mailman.interfaces.requests import IListRequests
from zope.component import getUtility
ml = getUtility(IListManager).get(sys.argv[1])
print("members:", " ".join(sorted(m.address.email for m in ml.members.members)))
for r in IListRequests(ml).held_requests:
    print("held:", r.request_type.name, r.key)
"""


LISTENING = r"""
import os, pwd, socket, struct, sys
uid = pwd.getpwnam(sys.argv[1]).pw_uid
inodes = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            continue
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        continue
assert inodes, "no socket of " + sys.argv[1]
for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
    for line in open(f"/proc/net/{name}").readlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # TCP_LISTEN
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            raw = b"".join(struct.pack("<I", *struct.unpack(">I", raw[i:i + 4]))
                           for i in range(0, len(raw), 4))
            print(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
"""
"""The TCP addresses a user's processes listen on ("ADDRESS:PORT" lines); run as that user."""


def send(host: Any, port: int, sender: str, password: str, to: str, subject: str,
         msgid: str = "") -> None:
    msgid = msgid or f"<{uuid.uuid4()}@test>"
    args = " ".join(shlex.quote(a) for a in (str(port), sender, password, to, subject, msgid))
    res = host.run(f"python3 -c {shlex.quote(SEND)} {args}")
    assert res.rc == 0, res.stdout + res.stderr


def mailman(host: Any) -> str:
    res = host.run(f"cd / && runuser -u list -- python3 -c {shlex.quote(MAILMAN)} {LIST}")
    assert res.rc == 0, res.stderr
    return res.stdout


def wait_grep(host: Any, box: str, pattern: str, timeout: float = 90) -> str:
    """The first message of ``box``'s Maildir matching ``pattern`` (grep -E)."""
    d = MAILDIR.format(box)
    deadline = time.monotonic() + timeout
    while True:
        res = host.run(f"grep -lE {shlex.quote(pattern)} {d}/* 2>/dev/null | head -1")
        if res.stdout.strip():
            return str(host.check_output(f"cat {res.stdout.strip()}"))
        assert time.monotonic() < deadline, (box, pattern, host.run(
            "journalctl -u postfix@- -u mailman3 -n 40 --no-pager").stdout)
        time.sleep(1)


@pytest.fixture(scope="module")
def subscribed(host: Any) -> str:
    """anna and bruno subscribe by mail (LIST-join@, from their mailbox through submission)
    and confirm with the token Mailman mails them; returns Mailman's view afterwards."""
    for who, pw in (ANNA, BRUNO):
        send(host, 587, who, pw, "alpha-news-join@asso.example", "subscribe")
    for who, pw in (ANNA, BRUNO):
        box = who.split("@")[0]
        # Mailman 3's notice: "Your confirmation is needed to join ...", from the list's
        # -confirm address with the token after the '+'.
        confirm = wait_grep(host, box, r"^From: alpha-news-confirm\+[0-9a-f]+@")
        token = re.search(r"^From: alpha-news-confirm\+([0-9a-f]+)@", confirm, re.M)
        assert token, confirm
        send(host, 587, who, pw, f"alpha-news-confirm+{token[1]}@asso.example",
             f"Re: confirm {token[1]}")
    deadline = time.monotonic() + 90
    while not all(w in mailman(host) for w in (ANNA[0], BRUNO[0])):
        assert time.monotonic() < deadline, mailman(host)
        time.sleep(1)
    return mailman(host)


def test_members_subscribe_by_mail_with_their_mailbox_login(subscribed: str) -> None:
    members = subscribed.splitlines()[0]
    assert members == f"members: {ANNA[0]} {BRUNO[0]}", subscribed


def test_a_members_post_reaches_every_subscriber(host: Any, subscribed: str) -> None:
    tag = f"Post {uuid.uuid4()}"
    send(host, 587, ANNA[0], ANNA[1], LIST, tag)
    for box in ("anna", "bruno"):
        msg = wait_grep(host, box, f"^Subject: .*{tag}")
        # "List-Id: DESCRIPTION <alpha-news.asso.example>" (RFC 2919)
        assert re.search(r"^List-Id: .*<alpha-news\.asso\.example>$", msg, re.M), msg
        # Signed by the mail server on the way out, like every other local sender's mail.
        assert "DKIM-Signature:" in msg, msg


def test_a_non_members_post_is_held(host: Any, subscribed: str) -> None:
    tag = f"Outsider {uuid.uuid4()}"
    msgid = f"<{uuid.uuid4()}@elsewhere.example>"
    send(host, 25, "outsider@elsewhere.example", "", LIST, tag, msgid)
    deadline = time.monotonic() + 60
    while f"held: held_message {msgid}" not in mailman(host):
        assert time.monotonic() < deadline, mailman(host)
        time.sleep(1)
    assert not host.run(f"grep -l {shlex.quote(tag)} {MAILDIR.format('bruno')}/*").stdout


def test_the_archive_is_private(host: Any, subscribed: str) -> None:
    """Posts are archived on the server (a Maildir per list), for the list user only; no
    web or REST port serves them."""
    tag = f"Archived {uuid.uuid4()}"
    send(host, 587, BRUNO[0], BRUNO[1], LIST, tag)
    wait_grep(host, "anna", f"^Subject: .*{tag}")
    deadline = time.monotonic() + 60
    while not host.run(f"grep -rl {shlex.quote(tag)} /var/lib/mailman3/archives").stdout:
        assert time.monotonic() < deadline, host.run("ls -R /var/lib/mailman3/archives").stdout
        time.sleep(1)
    var = host.file("/var/lib/mailman3")
    assert (var.user, var.group, var.mode) == ("list", "list", 0o750)
    res = host.run("runuser -u alpha -- ls /var/lib/mailman3/archives")
    assert res.rc != 0 and "Permission denied" in res.stderr, res.stdout
    # Mailman listens on its LMTP port only (127.0.0.1:8024): no REST API (8001), no web.
    # (Run as list: root in the container lacks CAP_SYS_PTRACE, so it cannot read the
    # sockets of another user's processes under /proc/PID/fd.)
    res = host.run(f"cd / && runuser -u list -- python3 -c {shlex.quote(LISTENING)} list")
    assert res.rc == 0, res.stderr
    assert res.stdout.split() == ["127.0.0.1:8024"], res.stdout


def test_list_mail_goes_out_through_the_counted_port(host: Any, subscribed: str) -> None:
    """Mailman hands its mail to the loopback smtpd that asks postfwd (sender: the list's
    bounces address), and postfwd counted every message it queued there on the list's own
    counters; only Mailman may connect to that port, only Postfix to Mailman's LMTP port."""
    sender = "alpha-news-bounces@asso.example"
    log = host.check_output("journalctl -t postfix/lists/smtpd -t postfix/qmgr --no-pager -o cat")
    on_port = set(re.findall(r"^([0-9A-F]+): client=localhost\[127\.0\.0\.1\]$", log, re.M))
    # Every message queued with the list's sender (qmgr logs each queued message once, from
    # any entry point) came in on the lists' port: the subscription notices and the posts.
    queued = set(re.findall(rf"^([0-9A-F]+): from=<{re.escape(sender)}>", log, re.M))
    assert len(queued) >= 4 and queued <= on_port, (sorted(queued - on_port), log)
    # postfwd's rate cache (its own dump, read from the running daemon): the list's daily
    # counter, created by the lists' port's rule, has counted each of these messages.
    # (postfwd's control commands exit 1 even when they answer.)
    cache = host.run("postfwd --dumpcache").stdout
    counts = re.findall(rf"%sender={re.escape(sender)} +-> %SELFHOST_LIST_DAY_10027\+\d+_86400 "
                        r"+-> @count +-> '(\d+)'", cache)
    assert [int(c) for c in counts] == [len(queued)], cache
    for port in (10027, 8024):
        res = host.run(f"runuser -u alpha -- bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}'")
        assert res.rc != 0, port
