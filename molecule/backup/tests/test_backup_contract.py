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


DAV_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
EVENT = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//selfhost//backup//EN\r\nBEGIN:VEVENT\r\n"
         "UID:backup-dump-1\r\nDTSTAMP:20260101T090000Z\r\nDTSTART:20260102T090000Z\r\n"
         "SUMMARY:Dump hook\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


def dav(host: Any, method: str, path: str, body: str = "") -> str:
    """A CalDAV request as alice through Caddy on the server (curl reads the password from
    its standard input config, never from a command line); returns the HTTP status."""
    password = os.environ.get("DAV_ALICE_PASSWORD", "molecule: Alice's calendar password, 2026!")
    name = host.backend.name if hasattr(host.backend, "name") else "bk-nas-bookworm"
    sh(host, f"cat > /var/tmp/dav-body <<'EOF'\n{body}EOF")
    res = subprocess.run(
        ["podman", "exec", "-i", name, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
         "-K", "-", "--cacert", DAV_CA, "--resolve", "dav.home.arpa:443:127.0.0.1",
         "-X", method, "--data-binary", "@/var/tmp/dav-body",
         f"https://dav.home.arpa{path}"],
        input=f'user = "alice:{password}"\n', capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_radicale_collections_are_dumped_under_its_lock_and_restored(host: Any) -> None:
    """Radicale's consistency hook (a real service module's `before`): the backup copies the
    collections under Radicale's storage lock into a root-only dump, which is what the
    snapshot holds and what `restore --service radicale` gives back."""
    deadline = time.monotonic() + 60
    while host.run(f"test -s {DAV_CA}").rc != 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert dav(host, "MKCALENDAR", "/alice/dumped/") in ("201", "405", "409")
    assert dav(host, "PUT", "/alice/dumped/e.ics", EVENT) in ("201", "204")
    lock = host.file("/var/lib/radicale/collections/.Radicale.lock")
    assert lock.exists and lock.user == "radicale"
    backup(host, "usb")
    dump = "/var/backups/selfhost/radicale"
    assert host.file(dump).mode == 0o700 and host.file(dump).user == "root"
    item = "collections/collection-root/alice/dumped/e.ics"
    assert "UID:backup-dump-1" in host.file(f"{dump}/{item}").content_string
    assert host.file("/var/lib/radicale/collections/.Radicale.lock").user == "radicale"
    name = host.backend.name if hasattr(host.backend, "name") else "bk-nas-bookworm"
    res = subprocess.run([sys.executable, "-m", "selfhost.backup.cli", "restore",
                          f"podman:{name}", "usb", "latest", "--service", "radicale",
                          "--to", "/var/tmp/dav-restore"], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=False)
    assert res.returncode == 0, res.stderr
    assert "SUMMARY:Dump hook" in host.file(f"/var/tmp/dav-restore{dump}/{item}").content_string
    sh(host, "rm -rf /var/tmp/dav-restore /var/tmp/dav-body")


def test_retention_forgets_simulated_history(host: Any) -> None:
    """60 daily snapshots (2024-05-02 .. 2024-06-30, 12:00) in a scratch repository that has
    the usb repository's settings and retention (keep_within 2d, daily 7, weekly 4, monthly 6),
    then the glue the backup timer runs forgets them (`selfhost-backup forget`, the step every
    `selfhost-backup run` ends with). Expected: 06-24..06-30 (daily), Sundays 06-23, 06-16,
    06-09 (weekly), 05-31 (monthly); keep_within 2d adds nothing new."""
    conf = "/etc/selfhost/backup"
    setup = (
        f"set -e; sed 's|^RESTIC_REPOSITORY=.*|RESTIC_REPOSITORY=/var/tmp/retention-repo|' "
        f"{conf}/usb.env > {conf}/retention.env; cp {conf}/repositories /var/tmp/repos.keep; "
        f"echo retention >> {conf}/repositories; "
        "set -a; . /etc/selfhost/backup/retention.env; set +a; rm -rf $RESTIC_REPOSITORY; "
        "restic init -q; "
        "for i in $(seq 59 -1 0); do d=$(date -u -d \"2024-06-30 12:00 UTC $i days ago\" \"+%F %T\"); "
        "restic backup -q --tag selfhost --time \"$d\" /etc/hostname; done"
    )
    try:
        sh(host, f"bash -c {shlex.quote(setup)}")
        assert len(json.loads(sh(host, "selfhost-backup restic retention snapshots --json"))) == 60
        sh(host, "selfhost-backup forget retention")
        snaps = json.loads(sh(host, "selfhost-backup restic retention snapshots --json"))
    finally:
        sh(host, f"mv /var/tmp/repos.keep {conf}/repositories; rm -f {conf}/retention.env; "
                 "rm -rf /var/tmp/retention-repo")
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

    def mails(monitor: bool = False) -> list[str]:
        """The mails received, in order: Monit's alerts (which arrive whenever a unit fails,
        e.g. in the tests that break a backup on purpose) apart from the others."""
        out = sh(host, f"cat {MAILS}/*.eml 2>/dev/null; true")
        return [m for m in out.split("X-Rcpt: ")
                if m and ("] monitor: " in m.split("\n\n", 1)[0]) == monitor]
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


def test_late_backup_alerts_and_status_shows_age(host: Any, smtp_sink: Any) -> None:
    since = sh(host, "date '+%F %T'")
    stamp = "/var/lib/selfhost-backup/friend.last-success"
    before = len(smtp_sink())
    _, found = selfhost_check(host)
    assert not [f for f in found if "is late" in f], found
    sh(host, f"cp {stamp} {stamp}.keep && echo $(( $(date +%s) - 50 * 3600 )) > {stamp}")
    try:
        assert host.run("systemctl start selfhost-backup-late.service").rc != 0
        log = sh(host, f"journalctl -t selfhost-backup -p err --since '{since}' --no-pager")
        assert "backup to repository friend is late: last success 50 hours ago" in log
        # ...and the admin got it by mail.
        deadline = time.monotonic() + 20
        while len(smtp_sink()) == before and time.monotonic() < deadline:
            time.sleep(0.5)
        mails = smtp_sink()
        assert len(mails) == before + 1, mails
        assert mails[-1].startswith("<alice@example.org>")
        assert "Subject: [nas] backup late: friend" in mails[-1]
        assert "last success 50 hours ago (limit 48 h)" in mails[-1]
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


def test_monit_mails_a_failed_unit_and_its_recovery(host: Any, smtp_sink: Any) -> None:
    """The monitoring module: a unit fails, Monit (10 s cycle in this model) mails the admin
    through the sendmail role once, and once more when the failure is gone."""
    assert host.service("monit").is_running
    unit = "selfhost-test-fails.service"
    # Start from no failed unit at all: an earlier test's late backup leaves
    # selfhost-backup-late.service failed (its alert), and Monit mails a change of state only.
    host.run("systemctl reset-failed")
    assert host.run("/usr/local/sbin/selfhost-monitor-probe failed-units").rc == 0
    time.sleep(25)  # two Monit cycles: it has seen the recovery (and mailed it) by now

    def wait_for(what: str) -> list[str]:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            got = [m for m in smtp_sink(monitor=True) if what in m]
            if got:
                return got
            time.sleep(1)
        raise AssertionError(f"no monitor mail with {what!r}: {smtp_sink(monitor=True)}")

    before = len(smtp_sink(monitor=True))
    host.run(f"systemd-run --unit={unit} --property=Type=oneshot /bin/false")
    assert host.run(f"systemctl is-failed {unit}").rc == 0
    failed = wait_for(unit)
    assert failed[-1].startswith("<alice@example.org>")
    assert "Subject: [nas] monitor: failed-units: Status failed" in failed[-1]
    sh(host, f"systemctl reset-failed {unit}")
    wait_for("monitor: failed-units: Status succeeded")
    mails = smtp_sink(monitor=True)[before:]
    assert len([m for m in mails if "failed-units: Status failed" in m]) == 1, mails
    log = sh(host, "journalctl -t selfhost-monitor --no-pager -n 20")
    assert "failed-units: Status failed" in log and unit in log, log


def test_a_damaged_repository_is_detected_and_alerted(host: Any, smtp_sink: Any) -> None:
    """A data pack of the usb repository disappears (a failing disk): the integrity check's
    timer unit fails, and its failure reaches the admin by mail. The pack is put back after."""
    repo = "/var/backups/restic-usb"
    assert host.run("systemctl start selfhost-backup-check-usb.service").rc == 0
    pack = sh(host, f"find {repo}/data -type f -printf '%s %p\\n' | sort -n | tail -n1 "
                    "| cut -d' ' -f2")
    assert pack.startswith(f"{repo}/data/"), pack
    before = len(smtp_sink())
    sh(host, f"mv {pack} /var/tmp/selfhost-pack.away")
    try:
        res = host.run("systemctl start selfhost-backup-check-usb.service")
        assert res.rc != 0
        log = sh(host, "journalctl -u selfhost-backup-check-usb.service -n 40 --no-pager")
        assert "does not exist" in log or "not found" in log or "missing" in log, log
        deadline = time.monotonic() + 20
        while len(smtp_sink()) == before and time.monotonic() < deadline:
            time.sleep(0.5)
        mails = smtp_sink()
        assert len(mails) == before + 1, mails
        assert "Subject: [nas] backup failed: selfhost-backup-check-usb.service" in mails[-1]
    finally:
        sh(host, f"mv /var/tmp/selfhost-pack.away {pack}; systemctl reset-failed")
    assert host.run("systemctl start selfhost-backup-check-usb.service").rc == 0
