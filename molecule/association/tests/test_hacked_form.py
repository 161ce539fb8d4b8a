"""A hacked form on alpha's site (examples/association.yaml: alpha's plan limits its mail a
minute): one request makes PHP's mail() send 500 messages. Past the limit alpha's mail is
held (Postfix's hold queue), every admin gets the alert naming alpha, the site and the
script, bravo's mail is delivered meanwhile; the held mail survives a restart of Postfix and
of the host (the container); ``selfhost held`` lists, releases and deletes it.

Outbound mail must not leave the test: the module sets Postfix's ``defer_transports = smtp``
for its duration, so mail to outside domains (the flood's passing messages, beatrice's copy
of the alert) waits in the deferred queue, where the test reads it; it is deleted and the
setting removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from member_sites import get, put

ALPHA_SITE = "alpha.asso.example"
BRAVO_SITE = "bravo.example"
FQDN = "asso.asso.example"
ALPHA = f"alpha@{FQDN}"
SCRIPT = f"/srv/members/alpha/sites/{ALPHA_SITE}/contact/send.php"
FLOOD = 500
REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _per_minute() -> int:
    """alpha's limit a minute: its plan's own, else the mail service's."""
    with open(os.path.join(REPO, "examples", "association.yaml")) as f:
        model = yaml.safe_load(f)
    services = model["services"]
    alpha = next(m for m in services["association"]["members"] if m["name"] == "alpha")
    plan = services["association"]["plans"].get(alpha.get("plan", "small"), {})
    return int(plan.get("mail_per_minute")
               or services["mail"].get("outbound_limits", {}).get("per_minute", 30))


LIMIT = _per_minute()

# The "hacked form": one request, 500 calls of mail() to outside addresses.
SEND = f"""<?php
$ok = 0;
for ($i = 1; $i <= {FLOOD}; $i++) {{
    if (mail('victim' . ($i % 5) . '@victims.example', "Win a prize $i", "Click here $i")) {{
        $ok++;
    }}
}}
echo "sent $ok";
"""
NEWS = f"""<?php
echo mail('charlie@{FQDN}', 'bravo news ' . $_GET['tag'], 'Hello from bravo') ? 'ok' : 'no';
"""






def queue(host: Any) -> list[dict[str, Any]]:
    out = host.check_output("postqueue -j")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def held_ids(host: Any, sender: str = ALPHA) -> list[str]:
    return sorted(e["queue_id"] for e in queue(host)
                  if e["queue_name"] == "hold" and e["sender"] == sender)


def selfhost_held(server: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "selfhost.cli", "held",
                          "examples/association.yaml", "--podman", server, *args],
                         cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def flood(host: Any) -> Iterator[dict[str, Any]]:
    """Mail to outside domains waits (defer_transports); alpha's form sends 500 messages in
    one request; then the queue settles (nothing left in the incoming/active queues)."""
    assert host.run("postconf -e defer_transports=smtp && postfix reload").rc == 0
    put(host, SCRIPT, SEND, "alpha")
    t0 = time.monotonic()
    assert get(host, ALPHA_SITE, "/contact/send.php", timeout=60) == (200, f"sent {FLOOD}")
    deadline = time.monotonic() + 120
    while True:
        entries = [e for e in queue(host) if e["sender"] == ALPHA]
        if len(entries) >= FLOOD and all(e["queue_name"] in ("hold", "deferred")
                                         for e in entries):
            break
        assert time.monotonic() < deadline, (len(entries), host.run("postqueue -p | tail"))
        time.sleep(1)
    yield {"seconds": time.monotonic() - t0}
    host.run("postconf -X defer_transports && postfix reload")
    # Whatever the test left for outside domains (deferred) is not to be sent anywhere.
    host.run("postqueue -j | python3 -c \"import json,sys; [print(e['queue_id']) for e in "
             "map(json.loads, sys.stdin) if e['queue_name'] == 'deferred']\" "
             "| postsuper -d - deferred")


def test_past_the_limit_alphas_mail_is_held(host: Any, flood: dict[str, Any]) -> None:
    entries = [e for e in queue(host) if e["sender"] == ALPHA]
    held = [e for e in entries if e["queue_name"] == "hold"]
    passed = [e for e in entries if e["queue_name"] == "deferred"]
    assert len(entries) == FLOOD
    # LIMIT a minute: the first LIMIT pass (LIMIT more per minute the flood may have lasted).
    assert LIMIT <= len(passed) <= LIMIT * (1 + int(flood["seconds"] // 60)), len(passed)
    assert len(held) == FLOOD - len(passed)
    # Attributed to the member's login, not the web server's or PHP's user.
    senders = {e["sender"] for e in queue(host)}
    assert not any(s.startswith(("www-data@", "caddy@")) for s in senders), senders
    one = host.check_output(f"postcat -hq {held[0]['queue_id']}")
    assert "X-PHP-Originating-Script: " in one and ":send.php" in one, one


def test_bravos_mail_is_delivered_meanwhile(host: Any, flood: dict[str, Any]) -> None:
    tag = str(time.time_ns())
    put(host, f"/srv/members/bravo/sites/{BRAVO_SITE}/news.php", NEWS, "bravo")
    assert get(host, BRAVO_SITE, f"/news.php?tag={tag}", timeout=60) == (200, "ok")
    deadline = time.monotonic() + 30
    while f"bravo news {tag}" not in host.run("cat /var/mail/charlie").stdout:
        assert time.monotonic() < deadline, host.run("postqueue -p | tail -20").stdout
        time.sleep(1)
    assert held_ids(host, f"bravo@{FQDN}") == []
    assert "From: bravo@" in host.check_output("cat /var/mail/charlie")


def test_every_admin_gets_the_alert_naming_member_site_and_script(
        host: Any, flood: dict[str, Any]) -> None:
    host.run("systemctl start selfhost-mail-limits.service")
    wanted = ["outbound limit reached (held: alpha)",
              f"member alpha, site {ALPHA_SITE}, script {SCRIPT}"]
    deadline = time.monotonic() + 90  # the timer runs every minute too
    while not all(w in host.run("cat /var/mail/antoine").stdout for w in wanted):
        assert time.monotonic() < deadline, host.run("cat /var/mail/antoine").stdout[-3000:]
        time.sleep(2)
    # beatrice's address is outside: her copy waits in the deferred queue (defer_transports).
    copies = [e for e in queue(host) if e["sender"] in (f"root@{FQDN}", "root")
              and any(r["address"] == "beatrice@beatrice.example" for r in e["recipients"])]
    assert copies, [e["recipients"] for e in queue(host) if e["sender"] != ALPHA]
    body = "".join(host.check_output(f"postcat -hbq {e['queue_id']}") for e in copies)
    assert all(w in body for w in wanted), body[-3000:]


def test_held_mail_survives_a_postfix_and_a_host_restart(host: Any,
                                                         flood: dict[str, Any]) -> None:
    ids = held_ids(host)
    assert len(ids) >= FLOOD - 30
    assert host.run("systemctl restart postfix").rc == 0
    assert held_ids(host) == ids
    name = str(host.backend.name)
    res = subprocess.run(["podman", "restart", "--time", "20", name], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    # Right after the start, podman exec or systemctl may not reach systemd yet: ask again.
    deadline, state = time.monotonic() + 120, ""
    while state not in ("running", "degraded"):
        assert time.monotonic() < deadline, state
        time.sleep(2)
        state = subprocess.run(["timeout", "120", "podman", "exec", name, "systemctl",
                                "is-system-running", "--wait"], capture_output=True,
                               text=True, check=False).stdout.strip()
    assert host.run("systemctl is-active postfix").stdout.strip() == "active"
    assert held_ids(host) == ids


def test_selfhost_held_lists_releases_and_deletes_alphas_mail(
        host: Any, flood: dict[str, Any]) -> None:
    name = str(host.backend.name)
    ids = held_ids(host)
    listing = selfhost_held(name, "--user", "alpha")
    assert f"{ALPHA}: {len(ids)} held (PHP script: " in listing, listing[:500]
    assert ":send.php)" in listing.splitlines()[1], listing[:500]
    assert all(i in listing for i in ids)
    assert "bravo@" not in listing
    out = selfhost_held(name, "--release", ids[0])
    assert f"released {ids[0]}" in out, out[:500]
    assert held_ids(host) == ids[1:]
    # Released: back in the normal queues (deferred here: mail to outside waits in the test).
    assert any(e["queue_id"] == ids[0] and e["queue_name"] != "hold" for e in queue(host)) \
        or ids[0] not in {e["queue_id"] for e in queue(host)}
    out = selfhost_held(name, "--user", "alpha", "--delete", "all")
    assert out.count("deleted ") == len(ids) - 1, out[-500:]
    assert held_ids(host) == [] and "no held mail" in out, out[-500:]
