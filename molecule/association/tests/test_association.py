"""Three members on one server (examples/association.yaml): alpha and bravo with PHP sites and a
database each, charlie with a static site. Each check runs inside the server: curl asks Caddy
on 127.0.0.1 for a member's host name over HTTPS (Caddy's internal CA), the PHP files are
written by the test as a member would upload them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from member_sites import CA, get, put

ALPHA_SITE = "alpha.asso.example"
BRAVO_SITE = "bravo.example"
CHARLIE_SITE = "charlie.asso.example"
ALPHA_PW = os.environ.get("ASSO_ALPHA_DB_PASSWORD", "molecule: alpha's database password, 2026!")
BRAVO_PW = os.environ.get("ASSO_BRAVO_DB_PASSWORD", "molecule: bravo's 'database' password, 2026!")
BRAVO_SECRET = "/srv/members/bravo/sites/bravo.example/secret.txt"

WHOAMI = "<?php echo posix_getpwuid(posix_geteuid())['name'];\n"
SLOW = "<?php sleep(4); echo 'slow done';\n"
STEAL = f"""<?php
$msgs = [];
set_error_handler(function ($no, $str) use (&$msgs) {{ $msgs[] = $str; return true; }});
$r = file_get_contents('{BRAVO_SECRET}');
echo $r === false ? 'DENIED: ' . implode(' | ', $msgs) : 'READ: ' . $r;
"""
# Reads the database and the password to try from the query string; answers JSON.
DB = """<?php
mysqli_report(MYSQLI_REPORT_OFF);
$c = @new mysqli('localhost', $_GET['user'], $_GET['password'], $_GET['db']);
if ($c->connect_errno) {
    echo json_encode(['ok' => false, 'errno' => $c->connect_errno, 'error' => $c->connect_error]);
} else {
    $r = $c->query('SELECT CURRENT_USER() AS u, DATABASE() AS d')->fetch_assoc();
    echo json_encode(['ok' => true, 'user' => $r['u'], 'db' => $r['d']]);
}
"""






@pytest.fixture(scope="module", autouse=True)
def uploads(host: Any) -> None:
    """What the members upload: the same PHP pages on alpha's and bravo's sites, a file of
    bravo's that alpha's script will try to read, charlie's static page."""
    for member, site in (("alpha", ALPHA_SITE), ("bravo", BRAVO_SITE)):
        docroot = f"/srv/members/{member}/sites/{site}"
        put(host, f"{docroot}/whoami.php", WHOAMI, member)
        put(host, f"{docroot}/slow.php", SLOW, member)
        put(host, f"{docroot}/db.php", DB, member)
    put(host, f"/srv/members/alpha/sites/{ALPHA_SITE}/steal.php", STEAL, "alpha")
    put(host, BRAVO_SECRET, "bravo's secret\n", "bravo")
    put(host, f"/srv/members/charlie/sites/{CHARLIE_SITE}/index.html", "charlie's page\n",
         "charlie")
    # Caddy issues its internal certificates on the first request: wait for it.
    for _ in range(30):
        if get(host, ALPHA_SITE, "/whoami.php")[0] == 200:
            return
        time.sleep(1)


def test_each_php_site_runs_as_its_member(host: Any) -> None:
    assert get(host, ALPHA_SITE, "/whoami.php") == (200, "alpha")
    assert get(host, BRAVO_SITE, "/whoami.php") == (200, "bravo")


def test_static_site_of_a_member_without_php(host: Any) -> None:
    assert get(host, CHARLIE_SITE, "/") == (200, "charlie's page\n")


def test_a_member_script_cannot_read_another_members_files(host: Any) -> None:
    status, body = get(host, ALPHA_SITE, "/steal.php")
    assert status == 200
    assert body.startswith("DENIED: "), body
    assert "open_basedir restriction in effect" in body, body
    assert "bravo's secret" not in body


def test_unix_permissions_keep_members_apart_without_php(host: Any) -> None:
    """Below open_basedir: a process of alpha's (a CGI, a shell a hacked script found) is
    refused by the file system itself."""
    res = host.run(f"runuser -u alpha -- cat {BRAVO_SECRET}")
    assert res.rc != 0
    assert "Permission denied" in res.stderr
    assert host.run("runuser -u alpha -- ls /srv/members/bravo").rc != 0
    assert host.run("runuser -u alpha -- ls /srv/members").rc != 0  # homes are not listed
    assert host.run(f"runuser -u bravo -- cat {BRAVO_SECRET}").stdout == "bravo's secret\n"


def test_members_have_no_login_shell(host: Any) -> None:
    for member in ("alpha", "bravo", "charlie"):
        user = host.user(member)
        assert user.shell == "/usr/sbin/nologin"
        assert user.home == f"/srv/members/{member}"
        home = host.file(user.home)
        assert home.mode == 0o750 and home.user == member and home.group == "caddy"


def test_one_pool_per_member_its_socket_for_caddy_only(host: Any) -> None:
    pools = host.run("ps -eo user:20,args | grep '[p]hp-fpm: pool'").stdout
    assert "www-data" not in pools
    for member in ("alpha", "bravo"):
        sock = host.file(f"/run/php/selfhost-{member}.sock")
        assert sock.is_socket
        assert sock.group == "caddy" and sock.mode == 0o660
        # A member cannot talk to another member's pool directly.
        res = host.run(f"runuser -u alpha -- python3 -c \"import socket; s = socket.socket("
                       f"socket.AF_UNIX); s.connect('/run/php/selfhost-{member}.sock')\"")
        assert res.rc != 0 and "Permission denied" in res.stderr
    assert host.file("/run/php/selfhost-charlie.sock").exists is False


def test_a_busy_member_does_not_block_another(host: Any) -> None:
    """alpha's slow page holds one of alpha's workers; bravo's page answers meanwhile."""
    start = host.run(f"(curl -s --max-time 15 --cacert {CA} --resolve "
                     f"{ALPHA_SITE}:443:127.0.0.1 https://{ALPHA_SITE}/slow.php "
                     "> /tmp/a14-slow 2>&1 &) ; sleep 1; date +%s.%N")
    assert start.rc == 0
    t0 = time.monotonic()
    assert get(host, BRAVO_SITE, "/whoami.php") == (200, "bravo")
    assert time.monotonic() - t0 < 2.5
    time.sleep(4)
    assert host.file("/tmp/a14-slow").content_string == "slow done"


def _db(host: Any, site: str, user: str, password: str, db: str) -> dict[str, Any]:
    from urllib.parse import urlencode

    status, body = get(host, site, "/db.php?" + urlencode(
        {"user": user, "password": password, "db": db}))
    assert status == 200, body
    return dict(json.loads(body))


def test_each_member_reaches_its_own_database(host: Any) -> None:
    assert _db(host, ALPHA_SITE, "alpha", ALPHA_PW, "alpha_site") == {
        "ok": True, "user": "alpha@localhost", "db": "alpha_site"}
    assert _db(host, BRAVO_SITE, "bravo", BRAVO_PW, "bravo_site") == {
        "ok": True, "user": "bravo@localhost", "db": "bravo_site"}


def test_a_member_cannot_open_another_members_database(host: Any) -> None:
    r = _db(host, ALPHA_SITE, "alpha", ALPHA_PW, "bravo_site")
    assert r["ok"] is False and r["errno"] == 1044, r  # access denied to database
    r = _db(host, ALPHA_SITE, "bravo", ALPHA_PW, "bravo_site")
    assert r["ok"] is False and r["errno"] == 1045, r  # wrong password


def test_mariadb_listens_on_the_loopback_only(host: Any) -> None:
    res = host.run("mariadb -N -B -e 'SELECT @@bind_address, @@local_infile'")
    assert res.rc == 0, res.stderr
    assert res.stdout.split() == ["127.0.0.1", "0"]
    grants = host.run("mariadb -N -B -e \"SHOW GRANTS FOR 'alpha'@'localhost'\"").stdout
    assert "`alpha_site`" in grants and "bravo" not in grants
    assert "GRANT ALL PRIVILEGES ON *.*" not in grants


def test_backup_hook_dumps_each_members_database(host: Any) -> None:
    host.run("mariadb alpha_site -e 'CREATE TABLE IF NOT EXISTS notes (t TEXT); "
             "INSERT INTO notes VALUES (\"alpha was here\")'")
    res = host.run("/usr/local/lib/selfhost/mariadb-dump")
    assert res.rc == 0, res.stderr
    alpha = host.file("/var/backups/selfhost/mariadb/alpha/alpha_site.sql")
    assert alpha.mode == 0o600 and "alpha was here" in alpha.content_string
    assert host.file("/var/backups/selfhost/mariadb/bravo/bravo_site.sql").exists
    assert host.file("/var/backups/selfhost/mariadb").mode == 0o700
