"""Members' calendar login (examples/association.yaml): Radicale at dav.asso.example has no users
of its own; the association asked for one login per member (the member's name and single
password, the one that opens its mailbox over IMAP: test_members_mail.py proves that side).

The CalDAV client is Python's http.client run inside the server: it connects to Caddy on
127.0.0.1:443 with the name dav.asso.example (SNI and Host) and trusts Caddy's internal CA;
the passwords come on standard input (never on a command line). Every request of a check is
sent by one client process (bcrypt makes each login cost a little).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Any

import pytest

DAV = "dav.asso.example"
CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
PASSWORDS = {
    "alpha": os.environ.get("ASSO_ALPHA_PASSWORD", "molecule: alpha's login, 2026!"),
    "bravo": os.environ.get("ASSO_BRAVO_PASSWORD", "molecule: bravo's login, 2026!"),
}

# Runs in the server: {"requests": [...]} on standard input, one result per request.
CLIENT = r"""
import base64, http.client, json, socket, ssl, sys
r = json.load(sys.stdin)
ctx = ssl.create_default_context(cafile=r["ca"])
out = []
for q in r["requests"]:
    conn = http.client.HTTPSConnection(r["host"], 443, context=ctx, timeout=15)
    conn._create_connection = (  # Caddy on this host, with the calendars' name
        lambda addr, *a, **k: socket.create_connection(("127.0.0.1", addr[1]), *a, **k))
    headers = dict(q.get("headers") or {})
    if q.get("user") is not None:
        token = (q["user"] + ":" + q["password"]).encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
    body = q.get("body")
    try:
        conn.request(q["method"], q["path"], body=body.encode() if body else None,
                     headers=headers)
        resp = conn.getresponse()
        out.append([resp.status, resp.read().decode("utf-8", "replace")])
    except OSError as e:
        out.append([0, type(e).__name__ + ": " + str(e)])
    finally:
        conn.close()
print(json.dumps(out))
"""

MKCALENDAR = """<?xml version="1.0" encoding="utf-8"?>
<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:set><D:prop><D:displayname>Alpha's board</D:displayname></D:prop></D:set>
</C:mkcalendar>
"""

EVENT = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//selfhost//molecule association//EN
BEGIN:VEVENT
UID:{uid}
DTSTAMP:20261130T080000Z
DTSTART:20261203T180000Z
DTEND:20261203T200000Z
SUMMARY:Alpha general assembly {uid}
END:VEVENT
END:VCALENDAR
"""

CALENDAR_QUERY = """<?xml version="1.0" encoding="utf-8"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:getetag/><C:calendar-data/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter>
  </C:filter>
</C:calendar-query>
"""


@pytest.fixture(scope="module")
def dav(host: Any) -> Any:
    """Send a list of requests (dicts: method, path, user, password, body, headers) from inside
    the server; returns [(status, body)] (status 0: no connection)."""
    name = str(host.backend.name)

    def send(*requests: dict[str, Any]) -> list[tuple[int, str]]:
        res = subprocess.run(["podman", "exec", "-i", name, "python3", "-c", CLIENT],
                             input=json.dumps({"host": DAV, "ca": CA,
                                               "requests": list(requests)}),
                             capture_output=True, text=True, timeout=120, check=True)
        return [(int(s), str(b)) for s, b in json.loads(res.stdout)]

    # Caddy issues its internal certificate for the name on its first start: wait for it.
    deadline = time.monotonic() + 45
    while True:
        [(status, body)] = send({"method": "OPTIONS", "path": "/"})
        if status or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 401, (status, body)  # nothing without a login
    return send


def login(member: str, password: str | None = None) -> dict[str, str]:
    return {"user": member, "password": PASSWORDS[member] if password is None else password}


@pytest.fixture(scope="module")
def alpha_calendar(dav: Any) -> tuple[str, str]:
    """Alpha, with its single password, creates a calendar and puts an event in it: (the
    event's path, its UID)."""
    uid = f"selfhost-asso-{uuid.uuid4().hex[:12]}"
    cal = f"/alpha/{uid}/"
    event = f"{cal}{uid}.ics"
    made, put = dav(
        {"method": "MKCALENDAR", "path": cal, "body": MKCALENDAR,
         "headers": {"Content-Type": "application/xml; charset=utf-8"}, **login("alpha")},
        {"method": "PUT", "path": event, "body": EVENT.format(uid=uid),
         "headers": {"Content-Type": "text/calendar; charset=utf-8"}, **login("alpha")})
    assert made[0] == 201, made
    assert put[0] == 201, put
    return event, uid


def test_a_member_keeps_a_calendar_with_its_single_password(dav: Any,
                                                            alpha_calendar: tuple[str, str]
                                                            ) -> None:
    event, uid = alpha_calendar
    report, got = dav(
        {"method": "REPORT", "path": event.rsplit("/", 1)[0] + "/", "body": CALENDAR_QUERY,
         "headers": {"Depth": "1", "Content-Type": "application/xml; charset=utf-8"},
         **login("alpha")},
        {"method": "GET", "path": event, **login("alpha")})
    assert report[0] == 207 and f"SUMMARY:Alpha general assembly {uid}" in report[1], report
    assert got[0] == 200 and f"UID:{uid}" in got[1], got


def test_another_member_cannot_read_or_write_alphas_calendar(dav: Any,
                                                             alpha_calendar: tuple[str, str]
                                                             ) -> None:
    event, uid = alpha_calendar
    own = f"/bravo/{uid}-bravo/"
    read, listed, write, mine = dav(
        {"method": "GET", "path": event, **login("bravo")},
        {"method": "PROPFIND", "path": "/alpha/", "headers": {"Depth": "1"}, **login("bravo")},
        {"method": "PUT", "path": event, "body": EVENT.format(uid=uid + "-bravo"),
         "headers": {"Content-Type": "text/calendar; charset=utf-8"}, **login("bravo")},
        # bravo's password is good: its own calendar is made (Radicale refused the others
        # because of owner_only, not because the login failed).
        {"method": "MKCALENDAR", "path": own, "body": MKCALENDAR,
         "headers": {"Content-Type": "application/xml; charset=utf-8"}, **login("bravo")})
    assert read[0] == 403 and uid not in read[1], read
    assert listed[0] == 403 and uid not in listed[1], listed
    assert write[0] == 403, write
    assert mine[0] == 201, mine


def test_a_wrong_password_gets_401(dav: Any, alpha_calendar: tuple[str, str]) -> None:
    event, uid = alpha_calendar
    wrong, others, nobody, mailbox = dav(
        {"method": "GET", "path": event, **login("alpha", PASSWORDS["alpha"] + "x")},
        {"method": "GET", "path": event, **login("alpha", PASSWORDS["bravo"])},
        {"method": "GET", "path": event},
        # The mailbox's login is its address; the calendar's is the member's name.
        {"method": "GET", "path": event, "user": "alpha@asso.example",
         "password": PASSWORDS["alpha"]})
    for status, body in (wrong, others, nobody, mailbox):
        assert status == 401 and uid not in body, (status, body)
