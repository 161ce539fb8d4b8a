"""Contract tests of the deployed backups (testinfra, podman backend), on the server container
with its friend's backup host next to it (same network namespace; sftp to 127.0.0.1:2222).

Run by Molecule's verifier, or by hand against converged containers:
    .venv/bin/pytest molecule/backup/tests --hosts=podman://bk-nas-bookworm
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPOS = ("usb", "friend")
WEB = "/srv/www/www.home.arpa"
EXTRA = "/srv/extra"
GLUE = "/usr/local/sbin/selfhost-backup"
REPO_ROOT = Path(__file__).resolve().parents[3]


def sh(host: Any, cmd: str) -> str:
    return str(host.check_output(cmd))


def manifest(host: Any, root: str, paths: tuple[str, ...] = (WEB, EXTRA)) -> str:
    """sha256 of every file under ``paths`` (below ``root``), with paths relative to root."""
    return sh(host, f"cd {root} && find {' '.join(p.lstrip('/') for p in paths)} -type f "
                    "-print0 | sort -z | xargs -0 sha256sum")


def backup(host: Any, repo: str) -> tuple[str, float]:
    t0 = time.monotonic()
    res = host.run(f"systemctl start selfhost-backup-{repo}.service")
    elapsed = time.monotonic() - t0
    assert res.rc == 0, host.run(f"journalctl -u selfhost-backup-{repo} -n 30 --no-pager").stdout
    snaps = json.loads(sh(host, f"{GLUE} restic {repo} snapshots --json --latest 1 --tag selfhost"))
    return snaps[-1]["short_id"], elapsed


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    out: dict[str, float] = {}
    yield out
    sys.stderr.write("\nbackup/restore timings (s): " + json.dumps(out) + "\n")
    Path(os.environ.get("SELFHOST_BACKUP_TIMINGS", "/tmp/selfhost-backup-timings.json")
         ).write_text(json.dumps(out, indent=2))


def test_deployed_files_are_private_and_secret_free(host: Any) -> None:
    for repo in REPOS:
        pw = host.file(f"/etc/selfhost/backup/{repo}.password")
        assert (pw.user, pw.group, pw.mode) == ("root", "root", 0o600)
        secret = pw.content_string.strip()
        for f in sh(host, "ls /etc/systemd/system/selfhost-backup* /etc/selfhost/backup/*.env "
                          "/usr/local/sbin/selfhost-backup").split():
            assert secret not in host.file(f).content_string, f
    assert host.file("/etc/selfhost/backup").mode == 0o700
    for t in ("selfhost-backup-usb.timer", "selfhost-backup-friend.timer",
              "selfhost-backup-check-friend.timer", "selfhost-backup-late.timer"):
        assert host.service(t).is_enabled and host.service(t).is_running, t
    props = sh(host, "systemctl show selfhost-backup-usb.timer -p RandomizedDelayUSec "
                     "-p Persistent")
    assert "Persistent=yes" in props and "RandomizedDelayUSec=1h" in props


def test_friend_account_is_sftp_only_and_chrooted(host: Any) -> None:
    import testinfra

    friend = testinfra.get_host("podman://" + host.backend.name.replace("bk-nas-", "bk-friend-"))
    conf = friend.check_output("/usr/sbin/sshd -T -C user=backup-nas,host=x,addr=127.0.0.1")
    assert "chrootdirectory /srv/backup-peers/nas" in conf
    assert "forcecommand internal-sftp" in conf
    assert "authenticationmethods publickey" in conf
    assert "backup-nas" in friend.check_output("/usr/sbin/sshd -T | grep -i '^allowusers'")
    assert friend.user("backup-nas").shell == "/usr/sbin/nologin"
    # The key cannot run commands: the forced internal-sftp does not run `id`.
    res = host.run("ssh -F /etc/selfhost/backup/friend.ssh_config selfhost-backup-friend id")
    assert "uid=" not in res.stdout
    # ...and cannot see outside its chroot.
    res = host.run("echo 'ls /' | sftp -b - -F /etc/selfhost/backup/friend.ssh_config "
                   "selfhost-backup-friend")
    assert res.rc == 0 and "etc" not in res.stdout.split() and "data" in res.stdout


def test_backup_modify_delete_restore_each_snapshot(host: Any, timings: dict[str, float]) -> None:
    sh(host, f"mkdir -p {WEB}/img {EXTRA} && echo '<h1>v1</h1>' > {WEB}/index.html && "
             f"head -c 3000000 /dev/urandom > {WEB}/img/photo.bin && "
             f"head -c 20000000 /dev/urandom > {EXTRA}/big.bin && echo one > {EXTRA}/note.txt")
    v1 = manifest(host, "/")
    s1 = {}
    for repo in REPOS:
        s1[repo], timings[f"{host.backend.name} backup1_{repo}"] = backup(host, repo)
    sh(host, f"echo '<h1>v2</h1>' > {WEB}/index.html && echo two >> {EXTRA}/note.txt && "
             f"head -c 100 /dev/urandom >> {EXTRA}/big.bin && echo new > {EXTRA}/added.txt")
    v2 = manifest(host, "/")
    assert v1 != v2
    s2 = {}
    for repo in REPOS:
        s2[repo], timings[f"{host.backend.name} backup2_{repo}"] = backup(host, repo)
        assert s2[repo] != s1[repo]
    sh(host, f"rm -rf {WEB}/* {EXTRA}")
    for repo in REPOS:
        for snap, expected in ((s1[repo], v1), (s2[repo], v2)):
            target = f"/var/tmp/restore-{repo}-{snap}"
            t0 = time.monotonic()
            sh(host, f"rm -rf {target} && {GLUE} restore {repo} {snap} {target} {WEB} {EXTRA}")
            timings[f"{host.backend.name} restore_{repo}_{'s1' if snap == s1[repo] else 's2'}"] = \
                time.monotonic() - t0
            assert manifest(host, target) == expected
            # byte for byte, not only hashes
            sh(host, f"cmp {target}{EXTRA}/big.bin {target}{EXTRA}/big.bin")
    # In place, the way an admin recovers: latest snapshot over the live (deleted) paths.
    sh(host, f"{GLUE} restore usb latest / {WEB} {EXTRA}")
    assert manifest(host, "/") == v2


def test_cli_restore_by_service(host: Any) -> None:
    name = host.backend.name if hasattr(host.backend, "name") else "bk-nas-bookworm"
    res = subprocess.run([sys.executable, "-m", "selfhost.backup.cli", "restore",
                          f"podman:{name}", "friend", "latest", "--service", "web",
                          "--to", "/var/tmp/cli-restore"], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=False)
    assert res.returncode == 0, res.stderr
    assert host.file(f"/var/tmp/cli-restore{WEB}/index.html").content_string == "<h1>v2</h1>\n"


def test_retention_forgets_simulated_history(host: Any) -> None:
    """60 daily snapshots (2024-05-02 .. 2024-06-30, 12:00), forgotten with the usb repository's
    configured retention (keep_within 2d, daily 7, weekly 4, monthly 6) by the same forget call
    as the glue. Expected: 06-24..06-30 (daily), Sundays 06-23, 06-16, 06-09 (weekly), 05-31
    (monthly); keep_within 2d adds nothing new."""
    script = (
        "set -e; set -a; . /etc/selfhost/backup/usb.env; set +a; "
        "export RESTIC_REPOSITORY=/var/tmp/retention-repo; rm -rf $RESTIC_REPOSITORY; "
        "restic init -q; "
        "for i in $(seq 59 -1 0); do d=$(date -u -d \"2024-06-30 12:00 UTC $i days ago\" \"+%F %T\"); "
        "restic backup -q --tag selfhost --time \"$d\" /etc/hostname; done; "
        "restic forget -q --tag selfhost --host $(hostname) --group-by host,tags --prune "
        "$SELFHOST_FORGET >/dev/null; restic snapshots --json"
    )
    snaps = json.loads(sh(host, f"bash -c {shlex.quote(script)}"))
    days = sorted(s["time"][:10] for s in snaps)
    expected = ["2024-05-31", "2024-06-09", "2024-06-16", "2024-06-23", "2024-06-24",
                "2024-06-25", "2024-06-26", "2024-06-27", "2024-06-28", "2024-06-29",
                "2024-06-30"]
    # restic >= 0.17 (Debian 13) also keeps the oldest snapshot while a --keep-monthly (or
    # other) policy has fewer periods than it asks for (here 2 months of 6): 2024-05-02.
    version = sh(host, "restic version").split()[1]
    if tuple(int(x) for x in version.split(".")[:2]) >= (0, 17):
        expected.insert(0, "2024-05-02")
    assert days == expected


# A minimal SMTP server for the tests, run on the server's own loopback: it stores each
# message it receives as a file (recipients first), so a test can read what was mailed.
SMTP_SINK = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 2525))
srv.listen(5)
n = 0
while True:
    conn, _ = srv.accept()
    f = conn.makefile("rwb")
    def say(text):
        f.write(text.encode() + b"\r\n")
        f.flush()
    say("220 sink ESMTP")
    rcpt = []
    for raw in f:
        cmd = raw.decode(errors="replace").strip()
        verb = cmd.upper()
        if verb.startswith("RCPT TO:"):
            rcpt.append(cmd[8:].strip())
            say("250 ok")
        elif verb == "DATA":
            say("354 go on")
            body = b""
            for line in f:
                if line.rstrip(b"\r\n") == b".":
                    break
                body += line
            n += 1
            with open(f"{sys.argv[1]}/{n:04d}.eml", "wb") as out:
                out.write(("X-Rcpt: " + " ".join(rcpt) + "\r\n").encode() + body)
            rcpt = []
            say("250 stored")
        elif verb == "QUIT":
            say("221 bye")
            break
        else:
            say("250 ok")
    conn.close()
"""
MAILS = "/var/tmp/selfhost-mails"


@pytest.fixture(scope="module")
def smtp_sink(host: Any) -> Any:
    host.run("pkill -f selfhost-smtp-sink.py")
    sh(host, f"rm -rf {MAILS} && mkdir -p {MAILS}")
    sh(host, f"cat > /var/tmp/selfhost-smtp-sink.py <<'EOF'\n{SMTP_SINK}\nEOF")
    sh(host, f"nohup python3 /var/tmp/selfhost-smtp-sink.py {MAILS} >/dev/null 2>&1 &")
    for _ in range(50):
        if host.run("ss -Hltn 'sport = :2525' | grep -q 2525").rc == 0:
            break
        time.sleep(0.1)

    def mails() -> list[str]:
        out = sh(host, f"cat {MAILS}/*.eml 2>/dev/null; true")
        return [m for m in out.split("X-Rcpt: ") if m]
    yield mails
    host.run("pkill -f selfhost-smtp-sink.py")


def test_failed_backup_alerts_in_journal_and_by_mail(host: Any, smtp_sink: Any) -> None:
    since = sh(host, "date '+%F %T'")
    sh(host, "mv /var/backups/restic-usb /var/backups/restic-usb.away")
    try:
        assert host.run("systemctl start selfhost-backup-usb.service").rc != 0
        time.sleep(2)
        log = sh(host, f"journalctl -t selfhost-backup -p err --since '{since}' --no-pager")
        assert "selfhost-backup-usb.service failed" in log
        # ...and the admin got a mail (root aliased to the notify address by msmtp).
        deadline = time.monotonic() + 20
        while not smtp_sink() and time.monotonic() < deadline:
            time.sleep(0.5)
        mails = smtp_sink()
        assert len(mails) == 1, mails
        assert mails[0].startswith("<alice@example.org>")
        assert "Subject: [nas] backup failed: selfhost-backup-usb.service" in mails[0]
        # never silently re-initialised
        assert not host.file("/var/backups/restic-usb/config").exists
    finally:
        sh(host, "rm -rf /var/backups/restic-usb; mv /var/backups/restic-usb.away "
                 "/var/backups/restic-usb; systemctl reset-failed")


def test_update_reports_are_mailed_to_the_admin(host: Any, smtp_sink: Any) -> None:
    dump = sh(host, "apt-config dump")
    assert 'Unattended-Upgrade::Mail "root";' in dump
    assert 'Unattended-Upgrade::MailReport "on-change";' in dump
    before = len(smtp_sink())
    # What unattended-upgrades runs to send its report (sendmail found, so no mailx).
    sh(host, "printf 'To: root\\nSubject: unattended-upgrades result\\n\\nok\\n' "
             "| /usr/sbin/sendmail -oi -t")
    deadline = time.monotonic() + 20
    while len(smtp_sink()) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    mails = smtp_sink()
    assert len(mails) == before + 1
    assert mails[-1].startswith("<alice@example.org>") and "unattended-upgrades" in mails[-1]


def test_the_daily_check_mails_the_admin_what_got_worse(host: Any, smtp_sink: Any) -> None:
    """The on-host check (its timer's service) mails the admin through the sendmail role when
    a finding appears, once: the next day's same news is not mailed again."""
    sh(host, "systemctl start selfhost-check.service")  # today's baseline
    before = len(smtp_sink())
    original = sh(host, "base64 -w0 /etc/issue.net")
    try:
        sh(host, "echo tampered >> /etc/issue.net")
        sh(host, "systemctl start selfhost-check.service")
        deadline = time.monotonic() + 20
        while len(smtp_sink()) == before and time.monotonic() < deadline:
            time.sleep(0.5)
        mails = smtp_sink()
        assert len(mails) == before + 1
        assert mails[-1].startswith("<alice@example.org>")
        assert "selfhost-check on" in mails[-1] and "/etc/issue.net differs" in mails[-1]
        sh(host, "systemctl start selfhost-check.service")  # the same news
        time.sleep(3)
        assert len(smtp_sink()) == before + 1
    finally:
        sh(host, f"echo {original} | base64 -d > /etc/issue.net")
        sh(host, "systemctl start selfhost-check.service")


def selfhost_check(host: Any) -> tuple[int, set[str]]:
    """`selfhost check` of the fleet's nas from the controller: exit status, findings."""
    res = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "selfhost"), "check",
                          str(REPO_ROOT / "molecule" / "backup" / "fleet.yaml"),
                          "--podman", f"nas={host.backend.name}", "--json"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode in (0, 1, 2), res.stderr
    return res.returncode, {f["what"] for f in json.loads(res.stdout)["findings"]}


LATE_CHECK = "backup to repository friend is late: last success 50 hours ago (limit 48 h)"
LATE_DAILY = "error\thealth\tbackup to repository friend is late (no success for 48 hours or more)"


def test_late_backup_alerts_and_status_shows_age(host: Any) -> None:
    since = sh(host, "date '+%F %T'")
    stamp = "/var/lib/selfhost-backup/friend.last-success"
    _, found = selfhost_check(host)
    assert not [f for f in found if "is late" in f], found
    sh(host, f"cp {stamp} {stamp}.keep && echo $(( $(date +%s) - 50 * 3600 )) > {stamp}")
    try:
        assert host.run("systemctl start selfhost-backup-late.service").rc != 0
        log = sh(host, f"journalctl -t selfhost-backup -p err --since '{since}' --no-pager")
        assert "backup to repository friend is late: last success 50 hours ago" in log
        # The same age is a health error of `selfhost check` and of the daily on-host check.
        code, found = selfhost_check(host)
        assert code == 2 and LATE_CHECK in found, found
        sh(host, "systemctl start selfhost-check.service")
        assert LATE_DAILY in sh(host, "cat /var/lib/selfhost/check/last")
    finally:
        sh(host, f"mv {stamp}.keep {stamp}; systemctl reset-failed")
    assert host.run("systemctl start selfhost-backup-late.service").rc == 0
    _, found = selfhost_check(host)
    assert not [f for f in found if "is late" in f], found
    sh(host, "systemctl start selfhost-check.service")
    assert LATE_DAILY not in sh(host, "cat /var/lib/selfhost/check/last")
    name = host.backend.name if hasattr(host.backend, "name") else "bk-nas-bookworm"
    res = subprocess.run([sys.executable, "-m", "selfhost.backup.cli", "backup-status",
                          f"podman:{name}", "--json"], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=False)
    rows = json.loads(res.stdout)
    assert res.returncode == 0 and {r["repository"] for r in rows} == set(REPOS)
    for r in rows:
        assert r["ok"] and r["snapshot"] and 0 <= r["age_hours"] < 1


def test_check_runs(host: Any) -> None:
    for repo in REPOS:
        res = host.run(f"systemctl start selfhost-backup-check-{repo}.service")
        assert res.rc == 0, host.run(f"journalctl -u selfhost-backup-check-{repo} -n 20").stdout
