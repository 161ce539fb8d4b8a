"""Mail to the admin through a real relay: Debian's Postfix in its own container
(molecule/ssh/relay.sh), which accepts mail only after STARTTLS and SASL AUTH. The server's
msmtp (selfhost's `notify`) must get the update report and a late-backup alert there."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from typing import Any

RELAY = "h16-relay"
RELAY_IP = "10.216.16.2"
STATE = "/var/lib/selfhost-backup"


def relay(cmd: str) -> str:
    return subprocess.run(["podman", "exec", RELAY, "sh", "-c", cmd], capture_output=True,
                          text=True, timeout=60, check=False).stdout


def mails(subject: str) -> list[str]:
    """The messages (headers and body) with ``subject`` in alice's mailbox on the relay."""
    box = relay("cat /var/mail/alice 2>/dev/null || true")
    return [m for m in re.split(r"^From ", box, flags=re.M) if subject in m]


def wait_for_mail(subject: str, before: int = 0, timeout: float = 60) -> str:
    """The first message with ``subject`` after the ``before`` already there."""
    deadline = time.monotonic() + timeout
    while True:
        found = mails(subject)
        if len(found) > before:
            return found[before]
        assert time.monotonic() < deadline, f"no new mail {subject!r} at the relay"
        time.sleep(1)


def test_relay_requires_starttls_and_auth(host: Any) -> None:
    """What the relay offers before STARTTLS (no AUTH; mail refused) and after it (AUTH)."""
    probe = (
        "import smtplib, ssl\n"
        f"s = smtplib.SMTP('{RELAY_IP}', 587, timeout=10); s.ehlo()\n"
        "print('auth-before-tls', s.has_extn('auth'))\n"
        "try:\n"
        "    s.sendmail('x@home.arpa', ['alice@example.org'], 'Subject: no\\n\\nno')\n"
        "    print('accepted-without-auth')\n"
        "except smtplib.SMTPException as e:\n"
        "    print('refused', e)\n"
        f"s = smtplib.SMTP('{RELAY_IP}', 587, timeout=10)\n"
        "s.starttls(context=ssl.create_default_context()); s.ehlo()\n"
        "print('auth-after-tls', s.has_extn('auth'))\n"
    )
    out = host.check_output(f"python3 -c {shlex.quote(probe)}")
    assert "auth-before-tls False" in out
    assert "refused" in out and "STARTTLS" in out and "accepted-without-auth" not in out
    assert "auth-after-tls True" in out


def test_update_report_reaches_the_admin_through_the_relay(host: Any) -> None:
    subject = f"unattended-upgrades result for {host.backend.name} {time.time_ns()}"
    # What unattended-upgrades runs to send its report (sendmail found, so no mailx).
    host.check_output(f"printf 'To: root\\nSubject: {subject}\\n\\nok\\n' "
                      "| /usr/sbin/sendmail -oi -t")
    msg = wait_for_mail(subject)
    assert "alice@example.org" in msg
    # Received with STARTTLS and AUTH ("ESMTPSA", RFC 3848; "UTF8SMTPSA", RFC 6531, from
    # Debian 13's msmtp), as the server's login.
    assert re.search(r"^\s+by relay\.test \(Postfix\) with (ESMTPSA|UTF8SMTPSA) ", msg,
                     re.M), msg
    log = relay("journalctl -q --no-pager -t postfix/submission/smtpd")
    assert "sasl_method=PLAIN, sasl_username=nas@home.arpa" in log


def test_late_backup_alert_reaches_the_admin_through_the_relay(host: Any) -> None:
    stamp = f"{STATE}/local.since"
    host.check_output(f"cp {stamp} {stamp}.keep && echo $(( $(date +%s) - 100 * 3600 )) "
                      f"> {stamp}")
    before = len(mails("backup late: local"))  # the other server's alert may be there
    try:
        assert host.run("systemctl start selfhost-backup-late.service").rc != 0
        msg = wait_for_mail("backup late: local", before)
        assert "backup to repository local is late" in msg
    finally:
        host.run(f"mv {stamp}.keep {stamp}; systemctl reset-failed")
