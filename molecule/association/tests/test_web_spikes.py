"""Web traffic watch on the members' sites (plan "php": 20 POSTs a minute per client, an
alert above 600 requests a minute): a client flooding alpha's form is banned by fail2ban
(nftables) while others still get through; a burst of requests alerts every admin.

The flooding client is an address the test adds to the server's loopback interface
(192.0.2.10, TEST-NET-1): 127.0.0.1 is never banned (fail2ban's ignoreip), and the traffic
stays inside the container. Mail to outside domains waits in Postfix's deferred queue while
the module runs (``defer_transports``) and is deleted at the end.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
SITE = "alpha.asso.example"
DOCROOT = f"/srv/members/alpha/sites/{SITE}"
CLIENT = "192.0.2.10"
JAIL = "caddy-post-20-60"


def curl(host: Any, path: str, *opts: str, source: str | None = None) -> str:
    """HTTP status codes of ``https://SITE/PATH`` (a curl URL glob: one line each), from
    127.0.0.1 or from ``source`` (to the same address)."""
    to = source or "127.0.0.1"
    via = f"--interface {source} " if source else ""
    url = shlex.quote(f"https://{SITE}{path}")
    res = host.run(f"curl -s --max-time 5 --cacert {CA} --resolve {SITE}:443:{to} {via}"
                   f"{' '.join(opts)} -w '\\n@@%{{http_code}}\\n' {url} 2>/dev/null; true")
    return "".join(x[2:] + "\n" for x in res.stdout.splitlines() if x.startswith("@@"))


def banned(host: Any) -> list[str]:
    out = host.run(f"fail2ban-client status {JAIL}").stdout
    line = next((x for x in out.splitlines() if "Banned IP list:" in x), "")
    return line.split("Banned IP list:")[1].split() if line else []


@pytest.fixture(scope="module", autouse=True)
def setup(host: Any) -> Iterator[None]:
    assert host.run("postconf -e defer_transports=smtp && postfix reload").rc == 0
    host.run(f"ip addr add {CLIENT}/32 dev lo")
    # fail2ban 1.1 (Debian 13) counts every address of the host's interfaces as itself
    # (ignoreself), so the test's client on lo would never be banned there (seen failing):
    # for the test only, at run time (the next restart of fail2ban puts it back).
    assert host.run(f"fail2ban-client set {JAIL} ignoreself false").rc == 0
    host.run(f"printf '%s' '<?php echo \"thanks\";' > {DOCROOT}/form.php && "
             f"printf 'hello\\n' > {DOCROOT}/hello.txt && "
             f"chown alpha:alpha {DOCROOT}/form.php {DOCROOT}/hello.txt")
    yield
    host.run(f"fail2ban-client set {JAIL} unbanip {CLIENT}")
    host.run(f"fail2ban-client set {JAIL} ignoreself true")
    host.run(f"ip addr del {CLIENT}/32 dev lo")
    host.run("postconf -X defer_transports && postfix reload")
    host.run("postqueue -j | python3 -c \"import json,sys; [print(e['queue_id']) for e in "
             "map(json.loads, sys.stdin) if e['queue_name'] == 'deferred']\" "
             "| postsuper -d - deferred")


def test_a_client_flooding_a_form_is_banned_then_let_in_again(host: Any) -> None:
    assert curl(host, "/form.php", source=CLIENT) == "200\n"
    assert CLIENT not in banned(host)
    codes = curl(host, "/form.php?[1-30]", "-d", "name=x", source=CLIENT).split()
    assert codes[:20] == ["200"] * 20, codes  # the first ones are served
    deadline = time.monotonic() + 20
    while CLIENT not in banned(host):
        assert time.monotonic() < deadline, host.run(f"fail2ban-client status {JAIL}").stdout
        time.sleep(1)
    assert curl(host, "/form.php", source=CLIENT) == "000\n"  # refused by nftables
    assert curl(host, "/form.php") == "200\n"  # everyone else still served
    assert host.run(f"fail2ban-client set {JAIL} unbanip {CLIENT}").rc == 0
    assert curl(host, "/form.php", source=CLIENT) == "200\n"


def test_a_request_burst_alerts_every_admin(host: Any) -> None:
    codes = curl(host, "/hello.txt?[1-700]").split()
    assert codes.count("200") == 700, codes[-5:]
    host.run("systemctl start selfhost-web-spikes.service")
    logged = host.run("journalctl -q -o cat -t selfhost-web-spikes").stdout
    assert f"traffic spike on {SITE}: " in logged, logged
    deadline = time.monotonic() + 30
    while f"web: traffic spike on {SITE}" not in host.run("cat /var/mail/antoine").stdout:
        assert time.monotonic() < deadline, host.run("postqueue -p | tail").stdout
        time.sleep(1)
    assert "bravo.example" not in logged  # the quiet site is not named
