"""Per-member backup and restore (issue 14): the real backup (the timer's service, with its
pre-backup hook dumping every member database) holds each member's sites and database dump;
after alpha's site file and database row are damaged, and bravo's are changed, restoring
alpha alone with `selfhost restore` (then loading alpha's restored dump) gives alpha's data
back and leaves bravo's later changes alone.

Member mailboxes are not in this branch (another part of issue 14 adds them): this proves
sites and database dumps only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

GLUE = "/usr/local/sbin/selfhost-backup"
REPO_ROOT = Path(__file__).resolve().parents[3]
ALPHA_PAGE = "/srv/members/alpha/sites/alpha.asso.example/page.txt"
BRAVO_PAGE = "/srv/members/bravo/sites/bravo.example/page.txt"
DUMPS = "/var/backups/selfhost/mariadb"


def sh(host: Any, cmd: str) -> str:
    res = host.run(cmd)
    assert res.rc == 0, (cmd, res.stdout, res.stderr)
    return str(res.stdout)


def put(host: Any, path: str, text: str, owner: str) -> None:
    sh(host, f"printf '%s\\n' '{text}' > {path} && chown {owner}:{owner} {path}")


def row(host: Any, db: str) -> str:
    return sh(host, f"mariadb -N -B {db} -e 'SELECT t FROM member_notes'").strip()


def set_row(host: Any, db: str, text: str) -> None:
    sh(host, f"mariadb {db} -e \"CREATE TABLE IF NOT EXISTS member_notes (t TEXT); "
             f"DELETE FROM member_notes; INSERT INTO member_notes VALUES ('{text}')\"")


def snapshot_files(host: Any, path: str) -> set[str]:
    out = sh(host, f"{GLUE} restic usb ls --json --recursive latest {path}")
    return {json.loads(line)["path"] for line in out.splitlines()
            if line.startswith("{") and '"path"' in line}


def test_a_members_restore_touches_no_other_member(host: Any) -> None:
    for member, page, db in (("alpha", ALPHA_PAGE, "alpha_site"),
                             ("bravo", BRAVO_PAGE, "bravo_site")):
        put(host, page, f"{member} before the backup", member)
        set_row(host, db, f"{member} before the backup")

    res = host.run("systemctl start selfhost-backup-usb.service")
    assert res.rc == 0, sh(host, "journalctl -u selfhost-backup-usb -n 30 --no-pager")

    # The snapshot holds each member's home and database dump, apart.
    for member, page, db in (("alpha", ALPHA_PAGE, "alpha_site"),
                             ("bravo", BRAVO_PAGE, "bravo_site")):
        assert page in snapshot_files(host, f"/srv/members/{member}")
        dump = f"{DUMPS}/{member}/{db}.sql"
        assert dump in snapshot_files(host, f"{DUMPS}/{member}")
        assert f"{member} before the backup" in sh(
            host, f"{GLUE} restic usb dump latest {dump}")
    assert ALPHA_PAGE not in snapshot_files(host, "/srv/members/bravo")

    # alpha's site is defaced and its database damaged; bravo keeps working meanwhile.
    put(host, ALPHA_PAGE, "hacked", "alpha")
    set_row(host, "alpha_site", "hacked")
    put(host, BRAVO_PAGE, "bravo after the backup", "bravo")
    set_row(host, "bravo_site", "bravo after the backup")

    # Restore alpha only, as an admin would: selfhost restore of alpha's paths in place,
    # then alpha's restored dump loaded into MariaDB.
    name = host.backend.name if hasattr(host.backend, "name") else "a14-bookworm"
    res = subprocess.run([sys.executable, "-m", "selfhost.backup.cli", "restore",
                          f"podman:{name}", "usb", "latest", "--path", "/srv/members/alpha",
                          "--path", f"{DUMPS}/alpha", "--in-place"], capture_output=True,
                         text=True, cwd=REPO_ROOT, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    sh(host, f"mariadb < {DUMPS}/alpha/alpha_site.sql")

    assert host.file(ALPHA_PAGE).content_string == "alpha before the backup\n"
    assert host.file(ALPHA_PAGE).user == "alpha"
    assert row(host, "alpha_site") == "alpha before the backup"
    # bravo's changes after the backup are not rolled back.
    assert host.file(BRAVO_PAGE).content_string == "bravo after the backup\n"
    assert row(host, "bravo_site") == "bravo after the backup"
