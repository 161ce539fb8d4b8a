"""Calendars and contacts behind the reverse proxy, checked with a real CalDAV/CardDAV client.

The client is a second container on an internal network that this scenario created (the
server at .2, the client at .3, the name dav.home.arpa pointing at the server): it speaks
HTTPS to Caddy, which checks the login and proxies to Radicale, as a phone would. The client
uses only Python's standard library (http.client, ssl) and trusts Caddy's internal CA.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
DAV = "dav.home.arpa"
CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
ALICE = os.environ.get("DAV_ALICE_PASSWORD", "molecule: Alice's calendar password, 2026!")
BOB = os.environ.get("DAV_BOB_PASSWORD", "molecule: Bob's address book password, 2026!")

CLIENT = r"""
import base64, http.client, json, ssl, sys
r = json.load(sys.stdin)
ctx = ssl.create_default_context(cafile="/tmp/selfhost-ca.crt")
try:
    conn = http.client.HTTPSConnection(r["host"], 443, context=ctx, timeout=8)
    headers = dict(r.get("headers") or {})
    if r.get("user") is not None:
        token = base64.b64encode((r["user"] + ":" + r["password"]).encode()).decode()
        headers["Authorization"] = "Basic " + token
    body = r.get("body")
    conn.request(r["method"], r["path"], body=body.encode() if body else None, headers=headers)
    resp = conn.getresponse()
    print(json.dumps({"status": resp.status, "body": resp.read().decode("utf-8", "replace")}))
except OSError as exc:
    print(json.dumps({"status": 0, "body": type(exc).__name__ + ": " + str(exc)}))
"""

EVENT = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//selfhost//molecule//EN
BEGIN:VEVENT
UID:selfhost-molecule-meeting
DTSTAMP:20261130T080000Z
DTSTART:20261201T090000Z
DTEND:20261201T100000Z
SUMMARY:Association board meeting
END:VEVENT
END:VCALENDAR
"""

CONTACT = """BEGIN:VCARD
VERSION:3.0
UID:selfhost-molecule-bob
FN:Bob Example
EMAIL:bob@example.org
END:VCARD
"""

MKCALENDAR = """<?xml version="1.0" encoding="utf-8"?>
<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:set><D:prop><D:displayname>Family</D:displayname></D:prop></D:set>
</C:mkcalendar>
"""

MKADDRESSBOOK = """<?xml version="1.0" encoding="utf-8"?>
<D:mkcol xmlns:D="DAV:" xmlns:CR="urn:ietf:params:xml:ns:carddav">
  <D:set><D:prop>
    <D:resourcetype><D:collection/><CR:addressbook/></D:resourcetype>
    <D:displayname>Contacts</D:displayname>
  </D:prop></D:set>
</D:mkcol>
"""

CALENDAR_QUERY = """<?xml version="1.0" encoding="utf-8"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:getetag/><C:calendar-data/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter>
  </C:filter>
</C:calendar-query>
"""


def podman(*args: str, stdin: str | None = None, check: bool = True) -> str:
    res = subprocess.run(["podman", *args], input=stdin, capture_output=True, text=True,
                         timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {res.stderr}")
    return res.stdout


@pytest.fixture(scope="module")
def names(host: Any) -> tuple[str, str]:
    """(server container, client container)."""
    server = str(host.backend.name)
    return server, f"{server}-client"


@pytest.fixture(scope="module")
def dav(host: Any, names: tuple[str, str]) -> Any:
    """A request function of the client container: (method, path, user, password, body,
    headers) -> (status, body). Status 0: no connection."""
    server, client = names
    deadline = time.monotonic() + 60
    while host.run(f"test -s {CA}").rc != 0 and time.monotonic() < deadline:
        time.sleep(1)
    ca = podman("exec", server, "cat", CA)
    podman("exec", "-i", client, "sh", "-c", "cat > /tmp/selfhost-ca.crt", stdin=ca)

    def request(method: str, path: str, user: str | None = None, password: str = "",
                body: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = {"host": DAV, "method": method, "path": path, "user": user,
               "password": password, "body": body, "headers": headers or {}}
        # The password travels on the client's standard input, never in a command line.
        out = podman("exec", "-i", client, "python3", "-c", CLIENT, stdin=json.dumps(req))
        data = json.loads(out)
        return int(data["status"]), str(data["body"])

    return request


def test_radicale_runs_behind_caddy_only(host: Any) -> None:
    assert host.service("radicale").is_running and host.service("radicale").is_enabled
    listening = host.check_output("ss -Hltn 'sport = :5232'")
    assert "127.0.0.1:5232" in listening and "0.0.0.0:5232" not in listening
    assert "*:5232" not in listening


def test_no_credentials_get_401(dav: Any) -> None:
    status, _ = dav("PROPFIND", "/alice/", headers={"Depth": "0"})
    assert status == 401


def test_caldav_event_created_and_read_back(dav: Any) -> None:
    status, body = dav("MKCALENDAR", "/alice/family/", "alice", ALICE, MKCALENDAR,
                       {"Content-Type": "application/xml"})
    assert status in (201, 405, 409), body  # 405/409: it exists (a re-run)
    status, body = dav("PUT", "/alice/family/meeting.ics", "alice", ALICE, EVENT,
                       {"Content-Type": "text/calendar"})
    assert status in (201, 204), body
    status, body = dav("REPORT", "/alice/family/", "alice", ALICE, CALENDAR_QUERY,
                       {"Content-Type": "application/xml", "Depth": "1"})
    assert status == 207, body
    assert "selfhost-molecule-meeting" in body and "Association board meeting" in body
    status, body = dav("GET", "/alice/family/meeting.ics", "alice", ALICE)
    assert status == 200 and "SUMMARY:Association board meeting" in body


def test_carddav_contact_created_and_read_back(dav: Any) -> None:
    status, body = dav("MKCOL", "/bob/contacts/", "bob", BOB, MKADDRESSBOOK,
                       {"Content-Type": "application/xml"})
    assert status in (201, 405, 409), body
    status, body = dav("PUT", "/bob/contacts/bob.vcf", "bob", BOB, CONTACT,
                       {"Content-Type": "text/vcard"})
    assert status in (201, 204), body
    status, body = dav("GET", "/bob/contacts/bob.vcf", "bob", BOB)
    assert status == 200 and "FN:Bob Example" in body


def test_a_user_cannot_read_another_users_collections(dav: Any) -> None:
    status, _ = dav("GET", "/alice/family/meeting.ics", "bob", BOB)
    assert status in (403, 404)


def test_only_the_proxy_may_connect_to_radicale(host: Any) -> None:
    """Radicale trusts X-Remote-User: a local user connecting to it directly could claim to
    be anyone, so only caddy (and root) may connect to its port."""
    probe = ("import socket; s = socket.socket(); s.settimeout(5); "
             "s.connect(('127.0.0.1', 5232)); print('connected')")
    as_nobody = host.run(f"runuser -u nobody -- python3 -c {shlex.quote(probe)}")
    assert as_nobody.rc != 0 and "connected" not in as_nobody.stdout
    assert "refused" in as_nobody.stderr.lower() or "reset" in as_nobody.stderr.lower()
    as_caddy = host.run(f"runuser -u caddy -- python3 -c {shlex.quote(probe)}")
    assert as_caddy.rc == 0 and "connected" in as_caddy.stdout


def test_restore_of_the_collections_brings_the_event_back(host: Any, dav: Any,
                                                          names: tuple[str, str]) -> None:
    """Back up with the real timer's service, lose the event, restore with `selfhost restore`
    (the CLI a user runs), and read it again over CalDAV."""
    assert dav("GET", "/alice/family/meeting.ics", "alice", ALICE)[0] == 200
    res = host.run("systemctl start selfhost-backup-usb.service")
    assert res.rc == 0, res.stderr + host.run(
        "journalctl -u selfhost-backup-usb.service -n 30 --no-pager").stdout
    assert dav("DELETE", "/alice/family/meeting.ics", "alice", ALICE)[0] in (200, 204)
    assert dav("GET", "/alice/family/meeting.ics", "alice", ALICE)[0] == 404
    server, _ = names
    cli = REPO / ".venv" / "bin" / "selfhost"
    res2 = subprocess.run([str(cli), "restore", f"podman:{server}", "usb", "--service",
                           "radicale", "--in-place"], capture_output=True, text=True,
                          timeout=300)
    assert res2.returncode == 0, res2.stdout + res2.stderr
    status, body = dav("GET", "/alice/family/meeting.ics", "alice", ALICE)
    assert status == 200 and "Association board meeting" in body


def test_selfhost_check_is_clean_and_sees_only_the_model_ports_from_outside(
        names: tuple[str, str]) -> None:
    """`selfhost check` from the controller, with the exposure probed from the client
    container: no drift, every health check of the calendars passes, and from outside only
    the ports of the model answer (Radicale's 5232 does not)."""
    platforms = yaml.safe_load((Path(__file__).parents[1] / "molecule.yml").read_text())
    subnet = next(p["subnet"] for p in platforms["platforms"] if p["name"] == names[0])
    res = subprocess.run(
        [str(REPO / ".venv" / "bin" / "selfhost"), "check",
         str(REPO / "examples" / "calendars.yaml"), "--podman", names[0], "--probe-from",
         names[1], "--probe-address", f"{subnet}.2", "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode in (0, 1), res.stdout + res.stderr
    found = json.loads(res.stdout)["findings"]
    assert [f["what"] for f in found if f["severity"] == "error"] == []
    assert not [f for f in found if f["area"] == "exposure"], found


def test_wrong_password_five_times_bans_the_client(host: Any, dav: Any,
                                                   names: tuple[str, str]) -> None:
    """Runs last: it bans the client. Five failed logins (requests that carried credentials
    and got 401) within fail2ban's window put the client's address into nftables."""
    platforms = yaml.safe_load((Path(__file__).parents[1] / "molecule.yml").read_text())
    subnet = next(p["subnet"] for p in platforms["platforms"] if p["name"] == names[0])
    client_ip = f"{subnet}.3"
    try:
        for _ in range(6):
            status, _ = dav("PROPFIND", "/alice/", "alice", "not the password",
                            headers={"Depth": "0"})
            if status == 0:
                break
            assert status == 401
        deadline = time.monotonic() + 45
        banned = ""
        while time.monotonic() < deadline:
            banned = host.check_output("fail2ban-client status caddy-auth")
            if client_ip in banned:
                break
            time.sleep(1)
        assert client_ip in banned, banned
        # The ban action puts the address into fail2ban's nftables set (a moment later).
        deadline = time.monotonic() + 15
        while client_ip not in (ruleset := host.check_output("nft list table inet f2b-table")):
            assert time.monotonic() < deadline, ruleset + host.run(
                "grep -i error /var/log/fail2ban.log | tail -5").stdout
            time.sleep(1)
        # Now even the right password does not get through: the connection is dropped.
        assert dav("PROPFIND", "/alice/", "alice", ALICE, headers={"Depth": "0"})[0] == 0
    finally:
        host.run("fail2ban-client unban --all")


def test_removing_the_service_stops_it_and_keeps_its_data(host: Any, names: tuple[str, str],
                                                          tmp_path: Path) -> None:
    """Runs last. The same model without `radicale`, deployed with the plain pyinfra CLI:
    Radicale is stopped and disabled, the web server (which only served it) too, their ports
    close, and the collections stay on disk."""
    model = yaml.safe_load((REPO / "examples" / "calendars.yaml").read_text())
    del model["services"]
    path = tmp_path / "without-calendars.yaml"
    path.write_text(yaml.safe_dump(model))
    res = subprocess.run(
        [str(REPO / ".venv" / "bin" / "pyinfra"), "-y", f"@podman/{names[0]}",
         str(REPO / "deploys" / "home_server.py"), "--data", f"selfhost_config={path}"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "services.radicale was removed from the model" in res.stderr
    for unit in ("radicale", "caddy"):
        svc = host.service(unit)
        assert not svc.is_running and not svc.is_enabled, unit
    assert host.file("/var/lib/radicale/collections/collection-root/alice").is_directory
    ruleset = host.check_output("nft list table inet selfhost")
    assert "dport 443" not in ruleset and "5232" not in ruleset
    manifest = json.loads(host.file("/var/lib/selfhost/manifest.json").content_string)
    assert manifest["services"] == {}
    # `selfhost check` says what was removed and where its data stays.
    check = subprocess.run([str(REPO / ".venv" / "bin" / "selfhost"), "check", str(path),
                            "--podman", names[0], "--json"], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert check.returncode in (0, 1), check.stdout + check.stderr
    infos = [f["what"] for f in json.loads(check.stdout)["findings"]
             if f["severity"] == "info"]
    assert any(i.startswith("services.radicale was removed from the model") and
               set(i.split("its data is kept: ", 1)[-1].split()) ==
               {"/var/lib/radicale/collections", "/var/backups/selfhost/radicale"}
               for i in infos), infos
